# SPDX-License-Identifier: Apache-2.0
"""SecureAggregation resumes a context from its file through ``Server.restore``.

No daemons: a resumed context needs no node, and an invalid file falls back to a
new setup, which then times out on the silent nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpc_runtime.memory import MemoryNetwork
from mpc_runtime.messages import StreamSpec
from mpc_runtime.protocol.server import ServerStage
from secagg import PhaseTimeout, SecureAggregation
from secagg.cli import main
from secagg.secure_aggregation import _context_key

from ._support import init_node, init_researcher

NODES = ("node-a", "node-b", "node-c")


def _deploy(tmp_path: Path) -> Path:
    home = init_researcher(tmp_path)
    pubs = [str(init_node(tmp_path, v) / "node.pub") for v in NODES]
    assert main(["researcher", "enroll", "--dir", str(home), *pubs]) == 0
    return home


def _context_file(home: Path, job_id: str, **changes: object) -> Path:
    """Write the file a researcher would have saved after setup and one round."""
    net = MemoryNetwork(list(NODES), job_id=job_id)
    net.setup()
    net.run_round(streams=[StreamSpec("value", (3,))])
    doc = {"format": 1, **net.server.record().to_dict(), **changes}
    path = home / "contexts" / f"{_context_key(job_id, NODES)}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _secagg(home: Path) -> SecureAggregation:
    return SecureAggregation(timeout=0.3, endpoint="tcp://127.0.0.1:0", home=home)


def test_setup_resumes_a_saved_context_without_any_node(tmp_path):
    home = _deploy(tmp_path)
    path = _context_file(home, "job-1")
    saved = json.loads(path.read_text())
    with _secagg(home) as sa:
        sa.setup(["researcher", *NODES], job_id="job-1")  # no daemon runs
        server = sa._servers[_context_key("job-1", NODES)]
        assert server.stage is ServerStage.READY
        assert server.context_id.hex() == saved["context_id"]
        assert server.transcript.hex() == saved["transcript"]
        assert server.last_round == saved["last_round"] == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"transcript": "00" * 16},
        {"context_id": "11" * 32},
        {"last_round": -1},
        {"identity_keys": {}},
        {"nonce": "not hex"},
    ],
)
def test_setup_ignores_an_invalid_context_file_and_sets_up_anew(
    tmp_path, changes, caplog
):
    home = _deploy(tmp_path)
    _context_file(home, "job-1", **changes)
    with _secagg(home) as sa:
        with pytest.raises(PhaseTimeout) as info:
            sa.setup(NODES, job_id="job-1")  # a new setup: every node is silent
    assert info.value.nodes == NODES
    assert "context file" in caplog.text

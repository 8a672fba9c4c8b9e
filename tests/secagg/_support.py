# SPDX-License-Identifier: Apache-2.0
"""Helpers of the secagg tests: directories made by the CLI, run in-process."""

from __future__ import annotations

from pathlib import Path

from secagg.cli import main

ENDPOINT = "tcp://127.0.0.1:5555"


def init_researcher(tmp_path: Path) -> Path:
    """Run ``secagg researcher init`` for ``tmp_path/R``; return the directory."""
    d = tmp_path / "R"
    assert main(["researcher", "init", "--dir", str(d)]) == 0
    return d


def init_node(tmp_path: Path, node_id: str, *extra: str) -> Path:
    """Run ``secagg node init`` for ``tmp_path/<node_id>``; return the directory."""
    d = tmp_path / node_id
    argv = ["node", "init", "--id", node_id, "--dir", str(d), "--researcher"]
    argv += [ENDPOINT, "--researcher-key", str(tmp_path / "R" / "researcher.pub")]
    assert main([*argv, *extra]) == 0
    return d

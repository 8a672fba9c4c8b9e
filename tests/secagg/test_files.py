# SPDX-License-Identifier: Apache-2.0
"""Tests of the key and roster files made by the CLI (DESIGN §1 "Files")."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import nacl.signing
import pytest
import zmq

from mpc_runtime.errors import ConfigError
from secagg import files
from secagg.cli import main
from secagg.config import NodeConfig

from ._support import ENDPOINT, init_node, init_researcher

REPO = Path(__file__).resolve().parents[2]
_Z85 = zmq.curve_keypair()[0].decode()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _no_temp_files(*dirs: Path) -> None:
    for d in dirs:
        for p in d.rglob("*"):
            assert not p.name.endswith(".tmp"), p


# ----------------------------------------------------------------- researcher


def test_researcher_init_writes_pub_and_0600_key(tmp_path):
    r = init_researcher(tmp_path)
    pub, key = _toml(r / "researcher.pub"), _toml(r / "researcher.key")
    assert set(pub) == {"id", "curve_public"} and pub["id"] == "researcher"
    assert set(key) == {"id", "curve_secret"} and key["id"] == "researcher"
    assert len(pub["curve_public"]) == len(key["curve_secret"]) == 40
    assert (
        zmq.curve_public(key["curve_secret"].encode()) == pub["curve_public"].encode()
    )
    assert _mode(r / "researcher.key") == 0o600
    assert _mode(r) == 0o700
    loaded = files.load_researcher_keys(r)
    assert loaded.curve_public == pub["curve_public"].encode()
    assert "curve_secret" not in repr(loaded) and key["curve_secret"] not in repr(
        loaded
    )
    _no_temp_files(r)


def test_researcher_init_custom_id(tmp_path):
    assert main(["researcher", "init", "--dir", str(tmp_path), "--id", "lab-1"]) == 0
    assert _toml(tmp_path / "researcher.pub")["id"] == "lab-1"
    assert files.load_researcher_keys(tmp_path).id == "lab-1"


def test_researcher_init_existing_refused_without_force(tmp_path, capsys):
    r = init_researcher(tmp_path)
    before = (r / "researcher.key").read_bytes()
    assert main(["researcher", "init", "--dir", str(r)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("secagg: error: ") and "--force" in err
    assert err.count("\n") == 1
    assert (r / "researcher.key").read_bytes() == before
    assert main(["researcher", "init", "--dir", str(r), "--force"]) == 0
    assert (r / "researcher.key").read_bytes() != before


# ----------------------------------------------------------------------- node


def test_node_init_writes_identity_config_and_pinned_researcher_key(tmp_path):
    r = init_researcher(tmp_path)
    d = init_node(tmp_path, "node-a", "--policy", "require")
    assert _mode(d / "node.key") == 0o600
    pub, key = _toml(d / "node.pub"), _toml(d / "node.key")
    assert set(pub) == {"id", "verify_key", "curve_public"} and pub["id"] == "node-a"
    assert set(key) == {"id", "signing_seed", "curve_secret"}
    seed = bytes.fromhex(key["signing_seed"])
    verify = bytes(nacl.signing.SigningKey(seed).verify_key)
    assert bytes.fromhex(pub["verify_key"]) == verify
    assert (
        zmq.curve_public(key["curve_secret"].encode()).decode() == pub["curve_public"]
    )
    assert (d / "researcher.pub").read_bytes() == (r / "researcher.pub").read_bytes()
    doc = _toml(d / "node.toml")
    assert doc == {
        "id": "node-a",
        "researcher": ENDPOINT,
        "policy": "require",
        "peer_trust": "roster",
        "disclose_clip_stats": False,
        "min_survivors": 2,
        "max_colluding_nodes": 0,
        "tasks": {},
        "plans": {},
        "data": {},
    }
    assert "[tasks]" in (d / "node.toml").read_text()
    identity = files.load_node_identity(d)
    assert identity.id == "node-a" and identity.verify_key == verify
    assert key["signing_seed"] not in repr(identity)
    assert files.load_pinned_researcher(d).id == "researcher"
    _no_temp_files(d)


def test_node_init_existing_identity_refused_without_force(tmp_path, capsys):
    init_researcher(tmp_path)
    d = init_node(tmp_path, "node-a")
    before = (d / "node.key").read_bytes()
    argv = ["node", "init", "--id", "node-a", "--dir", str(d), "--researcher"]
    argv += [ENDPOINT, "--researcher-key", str(tmp_path / "R" / "researcher.pub")]
    assert main(argv) == 1
    assert "node.key exists" in capsys.readouterr().err
    assert (d / "node.key").read_bytes() == before


def test_node_init_force_keeps_tasks(tmp_path):
    init_researcher(tmp_path)
    d = init_node(tmp_path, "node-a")
    text = (d / "node.toml").read_text()
    (d / "node.toml").write_text(
        text.replace("[tasks]\n", '[tasks]\nhist = "mod:hist"\n')
    )
    before = (d / "node.key").read_bytes()
    init_node(tmp_path, "node-a", "--force", "--policy", "refuse")
    assert (d / "node.key").read_bytes() != before
    config = NodeConfig.from_toml(d / "node.toml")
    assert dict(config.tasks) == {"hist": "mod:hist"} and config.policy == "refuse"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--id", "bad id"], "expected node id matching"),
        (["--researcher", "tcp://host"], "expected researcher endpoint like"),
        (["--researcher-key", "missing.pub"], "missing.pub: cannot read"),
    ],
)
def test_node_init_bad_arguments_exit_1(tmp_path, capsys, argv, message):
    init_researcher(tmp_path)
    base = {
        "--id": "node-a",
        "--dir": str(tmp_path / "node-a"),
        "--researcher": ENDPOINT,
        "--researcher-key": str(tmp_path / "R" / "researcher.pub"),
    }
    base[argv[0]] = argv[1]
    full = ["node", "init"] + [x for kv in base.items() for x in kv]
    assert main(full) == 1
    err = capsys.readouterr().err
    assert err.startswith("secagg: error: ") and message in err
    assert not (tmp_path / "node-a" / "node.key").exists()


def test_cli_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["node", "init", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("secagg: error: ") and err.count("\n") == 1
    assert (
        main(
            [
                "node",
                "init",
                "--id",
                "a",
                "--dir",
                "x",
                "--researcher",
                ENDPOINT,
                "--researcher-key",
                "k",
                "--policy",
                "maybe",
            ]
        )
        == 2
    )
    assert main([]) == 2


@pytest.mark.parametrize(
    "argv, match",
    [
        (["demo", "--nodes", "1"], "--nodes between 2 and 26"),
        (["demo", "--rounds", "0"], "--rounds >= 1"),
        (["demo", "--timeout", "0"], "--timeout > 0"),
        (["demo", "--out", "/nonexistent/dir"], "not a directory"),
    ],
)
def test_cli_demo_bad_arguments_exit_1_before_starting_anything(capsys, argv, match):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("secagg: error:") and match in err


def test_cli_node_start_without_node_files_exits_1(capsys, tmp_path):
    assert main(["node", "start", "--dir", str(tmp_path / "missing")]) == 1
    assert "secagg: error:" in capsys.readouterr().err


def test_cli_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "researcher" in capsys.readouterr().out


# ---------------------------------------------------------- enroll and trust


def test_researcher_enroll_copies_pub_under_inner_id(tmp_path):
    r = init_researcher(tmp_path)
    a = init_node(tmp_path, "node-a")
    renamed = tmp_path / "whatever.pub"
    renamed.write_bytes((a / "node.pub").read_bytes())
    assert main(["researcher", "enroll", "--dir", str(r), str(renamed)]) == 0
    assert (r / "nodes" / "node-a.pub").read_bytes() == (a / "node.pub").read_bytes()
    curve = _toml(a / "node.pub")["curve_public"].encode()
    assert files.load_enrolled(r) == {"node-a": curve}
    # Enrolling the same keys again is a no-op.
    assert main(["researcher", "enroll", "--dir", str(r), str(renamed)]) == 0
    assert [p.name for p in (r / "nodes").iterdir()] == ["node-a.pub"]


def test_researcher_enroll_changed_keys_refused_without_force(tmp_path, capsys):
    r = init_researcher(tmp_path)
    a = init_node(tmp_path, "node-a")
    assert main(["researcher", "enroll", "--dir", str(r), str(a / "node.pub")]) == 0
    first = (r / "nodes" / "node-a.pub").read_bytes()
    init_node(tmp_path, "node-a", "--force")
    assert main(["researcher", "enroll", "--dir", str(r), str(a / "node.pub")]) == 1
    assert "holds other keys for 'node-a'" in capsys.readouterr().err
    assert (r / "nodes" / "node-a.pub").read_bytes() == first
    argv = ["researcher", "enroll", "--dir", str(r), str(a / "node.pub"), "--force"]
    assert main(argv) == 0
    assert (r / "nodes" / "node-a.pub").read_bytes() != first


def test_researcher_enroll_needs_researcher_dir(tmp_path, capsys):
    init_researcher(tmp_path)
    a = init_node(tmp_path, "node-a")
    argv = ["researcher", "enroll", "--dir", str(tmp_path / "x"), str(a / "node.pub")]
    assert main(argv) == 1
    assert "is not a researcher directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_node_trust_builds_roster(tmp_path):
    init_researcher(tmp_path)
    a, b, c = (init_node(tmp_path, v) for v in ("node-a", "node-b", "node-c"))
    pubs = [str(x / "node.pub") for x in (a, b, c)]
    assert main(["node", "trust", "--dir", str(a), *pubs]) == 0
    assert sorted(p.name for p in (a / "peers").iterdir()) == [
        "node-b.pub",
        "node-c.pub",
    ]
    roster = files.load_roster(a)
    assert roster == {
        v: files.load_node_identity(d).verify_key
        for v, d in (("node-b", b), ("node-c", c))
    }
    assert files.load_roster(b) == {}


def test_node_trust_file_claiming_own_id_refused(tmp_path, capsys):
    init_researcher(tmp_path)
    a = init_node(tmp_path, "node-a")
    # Another node.pub with the same id and other keys (an impostor or a typo).
    other = tmp_path / "other"
    (other / "R").mkdir(parents=True)
    (other / "R" / "researcher.pub").write_bytes(
        (tmp_path / "R" / "researcher.pub").read_bytes()
    )
    twin = init_node(other, "node-a")
    assert main(["node", "trust", "--dir", str(a), str(twin / "node.pub")]) == 1
    assert "claims this node's id" in capsys.readouterr().err


def test_roster_with_mismatched_inner_id_rejected(tmp_path):
    init_researcher(tmp_path)
    a = init_node(tmp_path, "node-a")
    b = init_node(tmp_path, "node-b")
    assert main(["node", "trust", "--dir", str(a), str(b / "node.pub")]) == 0
    (a / "peers" / "node-b.pub").rename(a / "peers" / "node-z.pub")
    with pytest.raises(ConfigError, match=r"node-z\.pub: inner id 'node-b' differs"):
        files.load_roster(a)


def test_enrolled_with_mismatched_inner_id_rejected(tmp_path):
    r = init_researcher(tmp_path)
    b = init_node(tmp_path, "node-b")
    (r / "nodes").mkdir()
    (r / "nodes" / "node-a.pub").write_bytes((b / "node.pub").read_bytes())
    with pytest.raises(ConfigError, match="differs from the file name"):
        files.load_enrolled(r)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('id = "a"\ncurve_public = "x"\n', "missing key 'verify_key'"),
        ('id = "a"\nverify_key = "00"\ncurve_public = "x"\nz = 1\n', "unknown key"),
        ('id = "a b"\nverify_key = "00"\ncurve_public = "x"\n', "expected id"),
        (f'id = "a"\nverify_key = "00"\ncurve_public = "{_Z85}"\n', "64 hex digits"),
        # bytes.fromhex skips spaces: 64 characters, only 31 bytes.
        (
            f'id = "a"\nverify_key = "{"aa" * 31}  "\ncurve_public = "{_Z85}"\n',
            "64 hex digits",
        ),
    ],
)
def test_bad_pub_file_raises_config_error(tmp_path, text, message):
    path = tmp_path / "a.pub"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        files.read_public_keys(path, node=True)


def test_bad_z85_key_raises_config_error(tmp_path):
    path = tmp_path / "researcher.pub"
    path.write_text('id = "r"\ncurve_public = "' + "~" * 40 + '"\n')
    with pytest.raises(ConfigError, match="40 Z85 characters"):
        files.read_public_keys(path, node=False)


# ------------------------------------------------------------------ secrets


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_secret_file_with_open_permissions_refused(tmp_path, mode):
    init_researcher(tmp_path)
    a = init_node(tmp_path, "node-a")
    os.chmod(a / "node.key", mode)
    with pytest.raises(ConfigError, match=r"node\.key: permissions .* too open"):
        files.load_node_identity(a)
    os.chmod(tmp_path / "R" / "researcher.key", mode)
    with pytest.raises(ConfigError, match=r"researcher\.key: permissions"):
        files.load_researcher_keys(tmp_path / "R")


def test_secret_file_created_0600_despite_umask(tmp_path):
    old = os.umask(0)
    try:
        files.atomic_write(tmp_path / "s.key", b"x", secret=True)
        files.atomic_write(tmp_path / "p.pub", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "s.key") == 0o600
    assert _mode(tmp_path / "p.pub") == 0o644


def test_mismatched_key_and_pub_refused(tmp_path):
    init_researcher(tmp_path)
    a = init_node(tmp_path, "node-a")
    b = init_node(tmp_path, "node-b")
    (a / "node.pub").write_bytes((b / "node.pub").read_bytes())
    with pytest.raises(ConfigError, match=r"node\.pub: does not match"):
        files.load_node_identity(a)


# -------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "f.toml"
    files.atomic_write(path, b"old")
    files.atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.toml"]


def test_atomic_write_crash_before_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "node.toml"
    files.atomic_write(path, b"old")

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        files.atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["node.toml"]


def test_node_trust_crash_keeps_roster_intact(tmp_path, monkeypatch):
    init_researcher(tmp_path)
    a, b = init_node(tmp_path, "node-a"), init_node(tmp_path, "node-b")
    assert main(["node", "trust", "--dir", str(a), str(b / "node.pub")]) == 0
    before = (a / "peers" / "node-b.pub").read_bytes()
    init_node(tmp_path, "node-b", "--force")

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    argv = ["node", "trust", "--dir", str(a), str(b / "node.pub"), "--force"]
    assert main(argv) == 1
    assert (a / "peers" / "node-b.pub").read_bytes() == before
    _no_temp_files(a)


# ------------------------------------------------------------------ process


def test_python_m_secagg_runs_the_cli(tmp_path):
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "secagg", *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = tmp_path / "R"
    done = run("researcher", "init", "--dir", str(r))
    assert done.returncode == 0, done.stderr
    assert _mode(r / "researcher.key") == 0o600
    done = run("researcher", "init", "--dir", str(r))
    assert done.returncode == 1
    assert done.stderr.startswith("secagg: error: ") and done.stderr.count("\n") == 1
    # No node.toml there: a configuration error (the daemon itself is tested in
    # test_service.py).
    assert run("node", "start", "--dir", str(tmp_path)).returncode == 1

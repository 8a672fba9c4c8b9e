# SPDX-License-Identifier: Apache-2.0
"""The node's durable state on disk: a file-backed ``NodeStore`` (DESIGN §3).

Layout under the node directory ``N`` (every file written atomically, every
directory change fsynced)::

    N/node.lock                          flock()ed for the store's lifetime
    N/state/                             0700
    N/state/contexts/<context_id hex>/   exists = the context was begun (seen)
        steps/<round, 20 digits>.<phase>.msgpack   one committed step each
        context.msgpack                  0600: the ready ContextRecord (holds e_u)
    N/state/pins/<node id>.msgpack       TOFU-pinned Ed25519 keys (first pin wins)

A step is committed by writing and fsyncing a temporary file, then ``link()``-ing
it to its final name: the link fails if the step exists, so "commit at most once"
is enforced by the file system itself, and the directory is fsynced before
:meth:`FileNodeStore.commit` returns. The last round of a context is the largest
committed round, so it persists with the steps. Record files are msgpack maps with a
format version and their own key fields; they are read with bounded sizes, and a
file that does not decode or does not match its name raises
:class:`~mpc_runtime.errors.ConfigError` naming it: state is never silently reset.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import threading
import weakref
from pathlib import Path
from typing import Any, Final

import msgpack

from mpc_runtime.errors import ConfigError
from mpc_runtime.protocol.node import ContextRecord
from mpc_runtime.protocol.store import StepAlreadyCommitted

from .config import check_id
from .files import fsync_dir, read_secret, write_temp

__all__ = ["FileNodeStore", "LOCK_FILE", "STATE_DIR"]

logger = logging.getLogger(__name__)

LOCK_FILE: Final = "node.lock"
STATE_DIR: Final = "state"

_FORMAT: Final = 1
_MAX_RECORD_BYTES: Final = 1 << 20  # A ContextRecord of 10^4 nodes is ~1 MB.
_MAX_CONTEXT_ID: Final = 64
_STEP_RE: Final = re.compile(r"([0-9]{20})\.([a-z][a-z0-9-]{0,31})\.msgpack")
_PHASE_RE: Final = re.compile(r"[a-z][a-z0-9-]{0,31}")
_CONTEXT_RE: Final = re.compile(r"(?:[0-9a-f]{2}){1,64}")
_TMP_RE: Final = re.compile(r"\.[^/]+\.[0-9a-f]{12}\.tmp")


def _pack(doc: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


def _unpack(data: bytes, path: Path) -> dict[str, Any]:
    try:
        # The input is already bounded (at most _MAX_RECORD_BYTES were read), and
        # unpackb caps every container and string at the input length.
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    # msgpack documents that exceptions other than its own can escape unpackb on
    # malformed input, so this boundary catches broadly (STYLE §5).
    except Exception:
        raise ConfigError(f"{path}: corrupted state file (not msgpack)") from None
    if not isinstance(doc, dict) or doc.get("v") != _FORMAT:
        raise ConfigError(f"{path}: corrupted state file (expected format {_FORMAT})")
    return doc


def _read_bounded(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(_MAX_RECORD_BYTES + 1)
    if len(data) > _MAX_RECORD_BYTES:
        raise ConfigError(f"{path}: corrupted state file (too large)")
    return data


def _check_context_id(context_id: object) -> bytes:
    if not isinstance(context_id, bytes):
        raise TypeError(f"expected context_id bytes, got {type(context_id).__name__}")
    if not 1 <= len(context_id) <= _MAX_CONTEXT_ID:
        raise ValueError(
            f"expected context_id of 1-{_MAX_CONTEXT_ID} bytes, got {len(context_id)}"
        )
    return context_id


def _check_round(round_: object) -> int:
    if isinstance(round_, bool) or not isinstance(round_, int):
        raise TypeError(f"expected round int, got {type(round_).__name__}")
    if not 0 <= round_ < 10**20:
        raise ValueError(f"expected round in [0, 10**20), got {round_}")
    return round_


def _check_phase(phase: object) -> str:
    if not isinstance(phase, str) or _PHASE_RE.fullmatch(phase) is None:
        raise ValueError(f"expected phase matching {_PHASE_RE.pattern}, got {phase!r}")
    return phase


def _record_to_doc(record: ContextRecord) -> dict[str, Any]:
    return {"v": _FORMAT, **record.to_dict()}


def _record_from_doc(doc: dict[str, Any], path: Path) -> ContextRecord:
    return ContextRecord.from_dict(
        {k: v for k, v in doc.items() if k != "v"}, where=str(path)
    )


class FileNodeStore:
    """A :class:`~mpc_runtime.protocol.store.NodeStore` in a node directory.

    Parameters
    ----------
    directory
        The node directory ``N`` (created 0700 if missing). The store keeps an
        exclusive ``flock`` on ``N/node.lock`` until :meth:`close`, so one node
        directory serves one process (and one store) at a time.

    Raises
    ------
    ConfigError
        Another store holds the directory ("node directory is in use"), or a state
        file is corrupted (named in the message).

    Notes
    -----
    Only :class:`~mpc_runtime.protocol.node.ContextRecord` records can be saved.
    The store is usable as a context manager and is thread-safe.

    .. warning::
       :meth:`drop_context` overwrites the record file with zeros, fsyncs, and
       unlinks it. On copy-on-write or journaling file systems and SSDs the old
       blocks may survive on the medium; full-disk encryption is the remedy.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._mutex = threading.Lock()
        lock_path = self.directory / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"node directory is in use: {self.directory} "
                    f"(another process or store holds {lock_path})"
                ) from None
            raise
        self._lock_fd: int | None = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        try:
            self._state = self.directory / STATE_DIR
            self._contexts_dir = self._state / "contexts"
            self._pins_dir = self._state / "pins"
            for d in (self._state, self._contexts_dir, self._pins_dir):
                if not d.is_dir():
                    d.mkdir(mode=0o700)
                    fsync_dir(d.parent)
            self._seen: set[bytes] = set()
            self._steps: dict[tuple[bytes, int, str], bytes] = {}
            self._last: dict[bytes, int] = {}
            self._pins: dict[str, bytes] = {}
            self._load()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release the directory lock. The store cannot be used afterwards."""
        if self._lock_fd is not None:
            self._lock_fd = None
            self._finalizer()  # Closing the descriptor releases the flock.

    def __enter__(self) -> FileNodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise ConfigError(f"the store of {self.directory} is closed")

    # ------------------------------------------------------------------- loading

    def _load(self) -> None:
        for path in sorted(self._contexts_dir.iterdir()):
            if _CONTEXT_RE.fullmatch(path.name) is None or not path.is_dir():
                raise ConfigError(f"{path}: unexpected entry in the node state")
            cid = bytes.fromhex(path.name)
            self._seen.add(cid)
            self._last[cid] = 0
            steps = path / "steps"
            if not steps.is_dir():
                continue
            for step in sorted(steps.iterdir()):
                if _TMP_RE.fullmatch(step.name):
                    # A commit interrupted before its link(): it never happened.
                    step.unlink()
                    continue
                m = _STEP_RE.fullmatch(step.name)
                if m is None:
                    raise ConfigError(f"{step}: unexpected entry in the node state")
                round_, phase = int(m.group(1)), m.group(2)
                doc = _unpack(_read_bounded(step), step)
                digest = doc.get("digest")
                if (
                    doc.get("context_id") != cid
                    or doc.get("round") != round_
                    or doc.get("phase") != phase
                    or not isinstance(digest, bytes)
                ):
                    raise ConfigError(f"{step}: corrupted state file (fields)")
                self._steps[(cid, round_, phase)] = digest
                self._last[cid] = max(self._last[cid], round_)
            for entry in path.iterdir():
                if _TMP_RE.fullmatch(entry.name):
                    entry.unlink()
        for path in sorted(self._pins_dir.iterdir()):
            if _TMP_RE.fullmatch(path.name):
                path.unlink()
                continue
            node = path.name.removesuffix(".msgpack")
            doc = _unpack(_read_bounded(path), path)
            key = doc.get("key")
            if doc.get("node") != node or not isinstance(key, bytes):
                raise ConfigError(f"{path}: corrupted state file (fields)")
            self._pins[node] = key

    # ----------------------------------------------------------------- contexts

    def _context_dir(self, context_id: bytes) -> Path:
        return self._contexts_dir / _check_context_id(context_id).hex()

    def begin_context(self, context_id: bytes) -> None:
        path = self._context_dir(context_id)
        with self._mutex:
            self._check_open()
            if context_id in self._seen:
                raise StepAlreadyCommitted("context already seen", phase="setup")
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                raise StepAlreadyCommitted(
                    "context already seen", phase="setup"
                ) from None
            (path / "steps").mkdir(mode=0o700)
            fsync_dir(path)
            fsync_dir(self._contexts_dir)
            self._seen.add(context_id)
            self._last[context_id] = 0

    def seen_context(self, context_id: bytes) -> bool:
        with self._mutex:
            return context_id in self._seen

    def last_round(self, context_id: bytes) -> int:
        with self._mutex:
            return self._last.get(context_id, 0)

    def commit(self, context_id: bytes, round: int, phase: str, digest: bytes) -> None:  # noqa: A002
        path = self._context_dir(context_id)
        _check_round(round)
        _check_phase(phase)
        if not isinstance(digest, bytes):
            raise TypeError(f"expected digest bytes, got {type(digest).__name__}")
        key = (context_id, round, phase)
        with self._mutex:
            self._check_open()
            if key in self._steps:
                raise StepAlreadyCommitted(
                    f"step {phase} already committed", phase=phase, round=round
                )
            steps = path / "steps"
            if context_id not in self._seen:
                # A commit without begin_context (allowed by MemoryNodeStore):
                # the context becomes seen too.
                path.mkdir(mode=0o700, exist_ok=True)
                fsync_dir(self._contexts_dir)
                self._seen.add(context_id)
                self._last.setdefault(context_id, 0)
            if not steps.is_dir():
                steps.mkdir(mode=0o700)
                fsync_dir(path)
            name = f"{round:020d}.{phase}.msgpack"
            doc = {
                "v": _FORMAT,
                "context_id": context_id,
                "round": round,
                "phase": phase,
                "digest": digest,
            }
            tmp = write_temp(steps, name, _pack(doc), secret=False)
            try:
                # link() is atomic and fails if the name exists: at most one commit.
                os.link(tmp, steps / name)
            except FileExistsError:
                raise StepAlreadyCommitted(
                    f"step {phase} already committed", phase=phase, round=round
                ) from None
            finally:
                tmp.unlink()
            fsync_dir(steps)
            self._steps[key] = digest
            self._last[context_id] = max(self._last[context_id], round)

    def committed(self, context_id: bytes, round: int, phase: str) -> bytes | None:  # noqa: A002
        with self._mutex:
            return self._steps.get((context_id, round, phase))

    def save_context(self, context_id: bytes, record: Any) -> None:
        if not isinstance(record, ContextRecord):
            raise TypeError(
                f"expected record ContextRecord, got {type(record).__name__}"
            )
        path = self._context_dir(context_id)
        with self._mutex:
            self._check_open()
            path.mkdir(mode=0o700, exist_ok=True)
            tmp = write_temp(
                path, "context.msgpack", _pack(_record_to_doc(record)), secret=True
            )
            try:
                os.replace(tmp, path / "context.msgpack")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(path)

    def load_context(self, context_id: bytes) -> Any | None:
        path = self._context_dir(context_id) / "context.msgpack"
        with self._mutex:
            self._check_open()
            try:
                data = read_secret(path, _MAX_RECORD_BYTES)
            except ConfigError:
                if not path.exists() and not path.is_symlink():
                    return None
                raise
        record = _record_from_doc(_unpack(data, path), path)
        if record.context_id != context_id:
            raise ConfigError(f"{path}: corrupted state file (context_id)")
        return record

    def drop_context(self, context_id: bytes) -> None:
        path = self._context_dir(context_id) / "context.msgpack"
        with self._mutex:
            self._check_open()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                return
            try:
                # Best effort: overwrite the e key in place before unlinking, so a
                # plain file system does not keep it in freed blocks.
                size = os.fstat(fd).st_size
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.pwrite(fd, bytes(size), 0)
                    os.fsync(fd)
            finally:
                os.close(fd)
            path.unlink()
            fsync_dir(path.parent)

    # --------------------------------------------------------------------- pins

    def pinned_key(self, node: str) -> bytes | None:
        with self._mutex:
            return self._pins.get(node)

    def pin_key(self, node: str, key: bytes) -> None:
        check_id(node, "node id")
        if not isinstance(key, bytes):
            raise TypeError(f"expected key bytes, got {type(key).__name__}")
        with self._mutex:
            self._check_open()
            if node in self._pins:
                return  # First pin wins (TOFU).
            name = f"{node}.msgpack"
            doc = {"v": _FORMAT, "node": node, "key": key}
            tmp = write_temp(self._pins_dir, name, _pack(doc), secret=False)
            try:
                os.link(tmp, self._pins_dir / name)
            except FileExistsError:
                # Unreachable while we hold the directory lock; keep the first pin.
                raise ConfigError(f"{self._pins_dir / name}: pinned twice") from None
            finally:
                tmp.unlink()
            fsync_dir(self._pins_dir)
            self._pins[node] = key
            logger.info("pinned the identity key of node=%s (first sight)", node)

# SPDX-License-Identifier: Apache-2.0
"""Key and roster files of researchers and nodes (DESIGN §1), written atomically.

File formats (TOML; Ed25519 keys in lowercase hex, CurveZMQ keys in Z85 as
``zmq.curve_keypair()`` returns them, 40 characters):

- ``R/researcher.pub``: ``id``, ``curve_public``.
- ``R/researcher.key`` (0600): ``id``, ``curve_secret``.
- ``N/node.pub``: ``id``, ``verify_key`` (Ed25519, hex), ``curve_public`` (Z85).
- ``N/node.key`` (0600): ``id``, ``signing_seed`` (Ed25519 seed, hex),
  ``curve_secret`` (Z85).
- ``N/node.toml``: see :class:`secagg.config.NodeConfig`.
- ``N/researcher.pub``: the pinned copy of ``R/researcher.pub``.
- ``R/nodes/<id>.pub`` and ``N/peers/<id>.pub``: copies of ``node.pub``.

Every file is written through :func:`atomic_write` (temporary file in the same
directory, write, fsync, rename, fsync of the directory). Secret files are created
0600 from the start and refused on loading when group or others may read them.
"""

from __future__ import annotations

import binascii
import logging
import os
import secrets
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nacl.signing
import tomli_w
import zmq
import zmq.utils.z85

from mpc_runtime import keys
from mpc_runtime.errors import ConfigError

from .config import NodeConfig, check_endpoint, check_id, read_toml

__all__ = [
    "RESEARCHER_PUB",
    "RESEARCHER_KEY",
    "NODE_PUB",
    "NODE_KEY",
    "NODE_TOML",
    "NODES_DIR",
    "PEERS_DIR",
    "ResearcherKeys",
    "PublicKeys",
    "NodeIdentity",
    "atomic_write",
    "write_temp",
    "fsync_dir",
    "ensure_dir",
    "read_secret",
    "read_public_keys",
    "init_researcher",
    "init_node",
    "enroll_node",
    "trust_peers",
    "load_roster",
    "load_enrolled",
    "load_node_identity",
    "load_researcher_keys",
    "load_pinned_researcher",
]

logger = logging.getLogger(__name__)

RESEARCHER_PUB: Final = "researcher.pub"
RESEARCHER_KEY: Final = "researcher.key"
NODE_PUB: Final = "node.pub"
NODE_KEY: Final = "node.key"
NODE_TOML: Final = "node.toml"
NODES_DIR: Final = "nodes"
PEERS_DIR: Final = "peers"

_Z85_KEY_LEN: Final = 40  # Z85 of a 32-byte Curve25519 key (ZMTP CURVE, RFC 32).
_SECRET_MODE: Final = 0o600
_PUBLIC_MODE: Final = 0o644
_DIR_MODE: Final = 0o700

PathLike = str | os.PathLike[str]


# ------------------------------------------------------------------ atomic files


def fsync_dir(directory: PathLike) -> None:
    """Fsync a directory, so that entries created, renamed or removed are durable."""
    # POSIX: a rename is durable only once the directory entry itself is synced.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(directory: PathLike, name: str, data: bytes, *, secret: bool) -> Path:
    """Write and fsync ``data`` to a new temporary file in ``directory``; return it.

    Its name is ``.<name>.<12 hex digits>.tmp``. A secret file is created 0600 from
    the start (``os.open`` with the mode, then ``fchmod`` against the umask), so its
    contents are never readable by others, even briefly; a public one 0644 minus the
    umask. On failure the temporary file is removed.
    """
    tmp = Path(directory) / f".{name}.{secrets.token_hex(6)}.tmp"
    mode = _SECRET_MODE if secret else _PUBLIC_MODE
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            if secret:
                os.fchmod(fd, _SECRET_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: PathLike, data: bytes, *, secret: bool = False) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old or the new file.

    The temporary file (:func:`write_temp`) lives in the same directory, since a
    rename is atomic only within a file system; it is renamed over ``path`` and the
    directory is fsynced. On any failure the temporary file is removed and ``path``
    is untouched.
    """
    path = Path(path)
    tmp = write_temp(path.parent, path.name, data, secret=secret)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def ensure_dir(path: PathLike) -> Path:
    """Create ``path`` (0700: it holds secrets and state) if missing; return it."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        fsync_dir(path.parent)
    return path


def read_secret(path: PathLike, max_bytes: int = 1 << 20) -> bytes:
    """Read a secret file, refusing it if group or others have any permission.

    Like ssh with a private key, a secret others could read is not used: it may
    already be compromised, and using it silently would hide that.

    Raises
    ------
    ConfigError
        The file is missing, unreadable, not a regular file, too large, or its mode
        allows group/other access (the message names the file and the mode).
    """
    name = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise ConfigError(f"{name}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{name}: expected a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{name}: permissions {mode:04o} are too open; expected 0600 "
                f"(run: chmod 600 {name})"
            )
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise ConfigError(f"{name}: expected at most {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _toml_bytes(doc: dict[str, Any], comment: str) -> bytes:
    return (f"# {comment}\n" + tomli_w.dumps(doc)).encode()


# ------------------------------------------------------------------ key codecs


def _table(doc: dict[str, Any], source: str, required: Iterable[str]) -> None:
    required = tuple(required)
    for key in doc:
        if key not in required:
            raise ConfigError(
                f"{source}: unknown key {key!r} (expected {', '.join(required)})"
            )
    for key in required:
        if key not in doc:
            raise ConfigError(f"{source}: missing key {key!r}")


def _hex32(value: object, what: str, source: str) -> bytes:
    # bytes.fromhex skips whitespace, so the length is checked after decoding.
    if isinstance(value, str) and len(value) == 64:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            pass
        else:
            if len(raw) == 32:
                return raw
    raise ConfigError(f"{source}: expected {what} as 64 hex digits")


def _z85_key(value: object, what: str, source: str) -> bytes:
    if isinstance(value, str) and len(value) == _Z85_KEY_LEN:
        try:
            raw = value.encode("ascii")
            zmq.utils.z85.decode(raw)
        except (ValueError, KeyError, binascii.Error, TypeError):
            pass
        else:
            return raw
    raise ConfigError(f"{source}: expected {what} as {_Z85_KEY_LEN} Z85 characters")


def _doc_id(doc: dict[str, Any], source: str) -> str:
    try:
        return check_id(doc["id"])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


@dataclass(frozen=True, slots=True)
class PublicKeys:
    """The contents of a ``*.pub`` file.

    ``verify_key`` (Ed25519, 32 raw bytes) is None for the researcher, whose only
    key is its CurveZMQ server key; ``curve_public`` is Z85 (40 bytes).
    """

    id: str
    curve_public: bytes
    verify_key: bytes | None = None

    def to_toml(self) -> bytes:
        doc: dict[str, Any] = {"id": self.id}
        if self.verify_key is not None:
            doc["verify_key"] = self.verify_key.hex()
        doc["curve_public"] = self.curve_public.decode("ascii")
        who = "node" if self.verify_key is not None else "researcher"
        return _toml_bytes(doc, f"secagg {who} public keys; safe to share.")


def read_public_keys(path: PathLike, *, node: bool) -> PublicKeys:
    """Read a ``node.pub`` (``node=True``) or ``researcher.pub``.

    Raises
    ------
    ConfigError
        Unreadable file, unknown or missing key, invalid id or key encoding.
    """
    source = os.fspath(path)
    doc = read_toml(path)
    _table(
        doc,
        source,
        ("id", "verify_key", "curve_public") if node else ("id", "curve_public"),
    )
    ident = _doc_id(doc, source)
    curve = _z85_key(doc["curve_public"], "curve_public", source)
    verify = _hex32(doc["verify_key"], "verify_key", source) if node else None
    return PublicKeys(ident, curve, verify)


@dataclass(frozen=True, slots=True)
class ResearcherKeys:
    """The researcher's CurveZMQ server key pair (Z85 bytes)."""

    id: str
    curve_public: bytes
    curve_secret: bytes

    def __repr__(self) -> str:  # Never print the secret.
        return f"ResearcherKeys(id={self.id!r})"


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A node's long-term keys: Ed25519 signing key and CurveZMQ client key pair."""

    id: str
    signing_key: nacl.signing.SigningKey
    curve_public: bytes
    curve_secret: bytes

    @property
    def verify_key(self) -> bytes:
        """The Ed25519 public key (32 bytes), as in ``node.pub``."""
        return bytes(self.signing_key.verify_key)

    def public(self) -> PublicKeys:
        """The ``node.pub`` contents."""
        return PublicKeys(self.id, self.curve_public, self.verify_key)

    def __repr__(self) -> str:  # Never print the secrets.
        return f"NodeIdentity(id={self.id!r})"


# ------------------------------------------------------------------ researcher


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    for p in paths:
        if p.exists():
            raise ConfigError(
                f"{p} exists; refusing to replace an identity (pass --force)"
            )


def init_researcher(
    directory: PathLike, researcher_id: str = "researcher", *, force: bool = False
) -> ResearcherKeys:
    """Create the researcher's CurveZMQ server keys in ``directory``.

    Writes ``researcher.key`` (0600) then ``researcher.pub``.

    Raises
    ------
    ConfigError
        A bad id, or the keys exist and ``force`` is False.
    """
    check_id(researcher_id, "researcher id")
    d = Path(directory)
    _refuse_existing((d / RESEARCHER_KEY, d / RESEARCHER_PUB), force)
    ensure_dir(d)
    public, secret = zmq.curve_keypair()
    doc = {"id": researcher_id, "curve_secret": secret.decode("ascii")}
    atomic_write(
        d / RESEARCHER_KEY,
        _toml_bytes(doc, "secagg researcher secret key; keep private (0600)."),
        secret=True,
    )
    atomic_write(d / RESEARCHER_PUB, PublicKeys(researcher_id, public).to_toml())
    logger.info("researcher keys created: id=%s dir=%s", researcher_id, d)
    return ResearcherKeys(researcher_id, public, secret)


def load_researcher_keys(directory: PathLike) -> ResearcherKeys:
    """Load ``researcher.key`` and check it against ``researcher.pub``.

    Raises
    ------
    ConfigError
        Missing, malformed or too-open files, or a key pair that does not match.
    """
    d = Path(directory)
    source = os.fspath(d / RESEARCHER_KEY)
    doc = _secret_toml(d / RESEARCHER_KEY)
    _table(doc, source, ("id", "curve_secret"))
    ident = _doc_id(doc, source)
    secret = _z85_key(doc["curve_secret"], "curve_secret", source)
    pub = read_public_keys(d / RESEARCHER_PUB, node=False)
    if pub.id != ident or zmq.curve_public(secret) != pub.curve_public:
        raise ConfigError(f"{d / RESEARCHER_PUB}: does not match {source}")
    return ResearcherKeys(ident, pub.curve_public, secret)


def _secret_toml(path: Path) -> dict[str, Any]:
    raw = read_secret(path)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        # No parser detail: it could quote part of the secret.
        raise ConfigError(f"{path}: invalid TOML") from None


def _copy_pub(src: PathLike, dest_dir: PathLike, *, force: bool, what: str) -> Path:
    """Install node public keys ``src`` as ``dest_dir/<id>.pub``; return the path."""
    pub = read_public_keys(src, node=True)
    dest = ensure_dir(dest_dir) / f"{pub.id}.pub"
    if dest.exists():
        old = read_public_keys(dest, node=True)
        if old == pub:
            logger.info("%s %s already present: %s", what, pub.id, dest)
            return dest
        if not force:
            raise ConfigError(
                f"{dest} holds other keys for {pub.id!r}; refusing to replace them "
                "(pass --force if the node's keys really changed)"
            )
    atomic_write(dest, pub.to_toml())
    logger.info("%s %s installed: %s", what, pub.id, dest)
    return dest


def enroll_node(
    directory: PathLike, node_pub: PathLike, *, force: bool = False
) -> Path:
    """Copy a node's ``node.pub`` to ``R/nodes/<id>.pub`` (id from inside the file).

    Raises
    ------
    ConfigError
        An invalid file, or other keys already enrolled under that id (without
        ``force``).
    """
    d = Path(directory)
    if not (d / RESEARCHER_PUB).is_file():
        raise ConfigError(
            f"{d} is not a researcher directory (no {RESEARCHER_PUB}; run "
            "'secagg researcher init' first)"
        )
    return _copy_pub(node_pub, d / NODES_DIR, force=force, what="node")


def _load_pub_dir(directory: Path) -> dict[str, PublicKeys]:
    out: dict[str, PublicKeys] = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.pub")):
        pub = read_public_keys(path, node=True)
        if pub.id != path.stem:
            # DESIGN §3: a file whose inner id differs from its name is rejected.
            raise ConfigError(f"{path}: inner id {pub.id!r} differs from the file name")
        out[pub.id] = pub
    return out


def load_enrolled(directory: PathLike) -> dict[str, bytes]:
    """``{node id: CurveZMQ public key (Z85 bytes)}`` from ``R/nodes/*.pub``.

    Raises
    ------
    ConfigError
        A malformed file, or one whose inner id differs from its name.
    """
    pubs = _load_pub_dir(Path(directory) / NODES_DIR)
    return {v: p.curve_public for v, p in pubs.items()}


# ------------------------------------------------------------------ node


def init_node(
    directory: PathLike,
    node_id: str,
    researcher: str,
    researcher_key: PathLike,
    *,
    policy: str = "allow",
    peer_trust: str = "roster",
    force: bool = False,
) -> NodeIdentity:
    """Create a node's identity, ``node.toml`` and pinned researcher key.

    With ``force``, an existing ``node.toml``'s ``[tasks]``, ``[plans]`` and
    ``[data]`` are kept (the operator's work); everything else is replaced.

    Raises
    ------
    ConfigError
        Invalid arguments or researcher key file, or an existing identity without
        ``force``.
    """
    check_id(node_id, "node id")
    check_endpoint(researcher)
    d = Path(directory)
    _refuse_existing((d / NODE_KEY, d / NODE_PUB, d / NODE_TOML), force)
    pinned = read_public_keys(researcher_key, node=False)
    tables: dict[str, Any] = {}
    if (d / NODE_TOML).exists():
        try:
            old = NodeConfig.from_toml(d / NODE_TOML)
            tables = {"tasks": old.tasks, "plans": old.plans, "data": old.data}
        except ConfigError:
            logger.warning("replacing an invalid %s", d / NODE_TOML)
    config = NodeConfig(
        id=node_id,
        researcher=researcher,
        policy=policy,
        peer_trust=peer_trust,
        **tables,
    )
    ensure_dir(d)
    signing = keys.generate_signing_key()
    public, secret = zmq.curve_keypair()
    doc = {
        "id": node_id,
        "signing_seed": bytes(signing).hex(),
        "curve_secret": secret.decode("ascii"),
    }
    atomic_write(
        d / NODE_KEY,
        _toml_bytes(doc, "secagg node secret keys; keep private (0600)."),
        secret=True,
    )
    identity = NodeIdentity(node_id, signing, public, secret)
    atomic_write(d / NODE_PUB, identity.public().to_toml())
    atomic_write(d / RESEARCHER_PUB, pinned.to_toml())
    atomic_write(d / NODE_TOML, config.to_toml().encode())
    logger.info("node identity created: id=%s dir=%s", node_id, d)
    return identity


def load_node_identity(directory: PathLike) -> NodeIdentity:
    """Load ``node.key`` and check it against ``node.pub``.

    Raises
    ------
    ConfigError
        Missing, malformed or too-open files, or keys that do not match.
    """
    d = Path(directory)
    source = os.fspath(d / NODE_KEY)
    doc = _secret_toml(d / NODE_KEY)
    _table(doc, source, ("id", "signing_seed", "curve_secret"))
    ident = _doc_id(doc, source)
    seed = _hex32(doc["signing_seed"], "signing_seed", source)
    secret = _z85_key(doc["curve_secret"], "curve_secret", source)
    identity = NodeIdentity(
        ident, nacl.signing.SigningKey(seed), zmq.curve_public(secret), secret
    )
    pub = read_public_keys(d / NODE_PUB, node=True)
    if pub != identity.public():
        raise ConfigError(f"{d / NODE_PUB}: does not match {source}")
    return identity


def load_pinned_researcher(directory: PathLike) -> PublicKeys:
    """The researcher key the node pinned at init (``N/researcher.pub``).

    Raises
    ------
    ConfigError
        Missing or malformed file.
    """
    return read_public_keys(Path(directory) / RESEARCHER_PUB, node=False)


def trust_peers(
    directory: PathLike, pubs: Iterable[PathLike], *, force: bool = False
) -> list[Path]:
    """Add peers to the node's roster ``N/peers/<id>.pub``; return the files written.

    The node's own ``node.pub`` is skipped (a node is not its own peer); another
    file claiming the node's own id is refused.

    Raises
    ------
    ConfigError
        An invalid file, a file claiming this node's id with other keys, or other
        keys already trusted under that id (without ``force``).
    """
    d = Path(directory)
    own = read_public_keys(d / NODE_PUB, node=True)
    written = []
    for src in pubs:
        pub = read_public_keys(src, node=True)
        if pub.id == own.id:
            if pub != own:
                raise ConfigError(f"{src}: claims this node's id {own.id!r}")
            logger.info("skipping this node's own keys: %s", src)
            continue
        written.append(_copy_pub(src, d / PEERS_DIR, force=force, what="peer"))
    return written


def load_roster(directory: PathLike) -> dict[str, bytes]:
    """``{peer id: Ed25519 verify key (32 bytes)}`` from ``N/peers/*.pub``.

    Raises
    ------
    ConfigError
        A malformed file, or one whose inner id differs from its name (DESIGN §3).
    """
    pubs = _load_pub_dir(Path(directory) / PEERS_DIR)
    return {v: p.verify_key for v, p in pubs.items() if p.verify_key is not None}

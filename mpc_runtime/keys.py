# SPDX-License-Identifier: Apache-2.0
"""Hazmat key operations (DESIGN §3): Ed25519, X25519, HKDF-SHA256, XChaCha20-Poly1305.

.. warning::
   This is a *hazmat* module: every parameter is explicit and nothing is chosen for
   the caller. It is meant for the protocol state machines in
   :mod:`mpc_runtime.protocol`; users want the recipes in :mod:`secagg`.

Every KDF ``info``, signed payload and AEAD associated data goes through
:func:`mpc_runtime.encoding.encode`; there is no other concatenation. Keys of the
wrong type or length raise ``TypeError``/``ValueError`` ("expected 32 bytes, got N"),
which are programming errors. Anything an adversary controls (a signature, a relayed
public key, a box) fails with :class:`~mpc_runtime.errors.AuthenticationError`,
raised ``from None`` with a fixed message so that it is no oracle. No message or log
line ever contains key material.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mpc_runtime.encoding import encode
from mpc_runtime.errors import AuthenticationError

__all__ = [
    "SIGNATURE_SIZE",
    "PUBLIC_KEY_SIZE",
    "SECRET_KEY_SIZE",
    "SEED_SIZE",
    "MASK_KEY_SIZE",
    "SHARE_KEY_SIZE",
    "NONCE_SIZE",
    "DIGEST_SIZE",
    "generate_signing_key",
    "sign",
    "verify",
    "generate_x25519",
    "x25519_public",
    "x25519",
    "hkdf",
    "share_key",
    "mask_key",
    "self_key",
    "seed_commitment",
    "seal",
    "open_sealed",
    "share_aad",
]

#: Ed25519 signature (RFC 8032 §5.1.6).
SIGNATURE_SIZE: Final = 64
#: Ed25519 and X25519 public keys (RFC 8032 §5.1.5, RFC 7748 §5).
PUBLIC_KEY_SIZE: Final = 32
#: X25519 scalars and Ed25519 seeds.
SECRET_KEY_SIZE: Final = 32
#: The per-round self seed b_u^r (DESIGN §3).
SEED_SIZE: Final = 16
#: AES-128 key of one mask keystream (DESIGN §3, PRG).
MASK_KEY_SIZE: Final = 16
#: XChaCha20-Poly1305 key of the share boxes.
SHARE_KEY_SIZE: Final = 32
#: XChaCha20 nonce (draft-irtf-cfrg-xchacha §2).
NONCE_SIZE: Final = 24
#: SHA-256 output: the transcript T and the request digest D_r.
DIGEST_SIZE: Final = 32

# Poly1305 tag length (RFC 8439 §2.5); a box shorter than nonce + tag cannot be valid.
_TAG_SIZE: Final = 16
_HKDF_MAX_LENGTH: Final = 255 * 32  # RFC 5869 §2.3: L <= 255 * HashLen.
_ALL_ZERO: Final = bytes(32)
_SHARE_KINDS: Final = frozenset({"c", "b"})

# One fixed text per failure class, so that no failure says *why* it failed.
_BAD_SIGNATURE: Final = "signature verification failed"
_BAD_BOX: Final = "decryption failed"
_LOW_ORDER: Final = "X25519 produced the all-zero shared secret (RFC 7748 §6.1)"


def _check_bytes(value: object, size: int | None, name: str) -> bytes:
    """Return ``value`` as ``bytes`` after checking its type and, if given, length.

    The messages name the parameter and the lengths only, never the contents.
    """
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise TypeError(f"{name}: expected bytes, got {type(value).__name__}")
    if size is not None and len(value) != size:
        raise ValueError(f"{name}: expected {size} bytes, got {len(value)}")
    return value


def _check_id(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected str, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- Ed25519


def generate_signing_key() -> nacl.signing.SigningKey:
    """Return a fresh long-term Ed25519 signing key.

    Returns
    -------
    nacl.signing.SigningKey
        Seeded with 32 bytes from ``os.urandom`` (DESIGN §3: the OS CSPRNG only).
    """
    return nacl.signing.SigningKey(os.urandom(SECRET_KEY_SIZE))


def sign(key: nacl.signing.SigningKey, label: str, *fields: object) -> bytes:
    """Sign ``encode(label, *fields)`` with Ed25519.

    Parameters
    ----------
    key
        The node's long-term signing key.
    label, fields
        The payload, encoded by :func:`mpc_runtime.encoding.encode`.

    Returns
    -------
    bytes
        The 64-byte detached signature.

    Raises
    ------
    TypeError
        ``key`` is not a ``SigningKey``, or a field the encoding does not define.
    ValueError
        A field the encoding refuses (see :func:`~mpc_runtime.encoding.encode`).
    """
    if not isinstance(key, nacl.signing.SigningKey):
        raise TypeError(
            f"key: expected nacl.signing.SigningKey, got {type(key).__name__}"
        )
    return key.sign(encode(label, *fields)).signature


def verify(public_key: bytes, signature: bytes, label: str, *fields: object) -> None:
    """Verify an Ed25519 signature over ``encode(label, *fields)``.

    Parameters
    ----------
    public_key
        The signer's 32-byte Ed25519 public key (from the roster).
    signature
        The 64-byte detached signature, as relayed.
    label, fields
        The payload the signature must cover.

    Raises
    ------
    AuthenticationError
        On any failure of the key or signature: wrong type or length, a key that is
        not a valid point, a small-order key, or a bad signature. Always the same
        message and raised ``from None``, so it is no oracle.
    TypeError, ValueError
        A field the encoding refuses; this is the caller's bug, checked before any
        key is looked at.

    Notes
    -----
    libsodium's ``crypto_sign_verify_detached`` rejects non-canonical signatures
    (S ≥ L, RFC 8032 §5.1.7) and small-order public keys.
    """
    message = encode(label, *fields)
    try:
        if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
            raise ValueError
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            raise ValueError
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    # Catch broadly here only: whatever PyNaCl raises for hostile input must leave as
    # one opaque AuthenticationError (STYLE §5), never as a distinguishable type.
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise AuthenticationError(_BAD_SIGNATURE) from None


# ---------------------------------------------------------------------------- X25519


def generate_x25519() -> tuple[bytes, bytes]:
    """Return a fresh X25519 key pair ``(secret, public)``.

    Returns
    -------
    tuple of bytes
        ``secret`` is 32 bytes from ``os.urandom``, stored unclamped (RFC 7748 §5:
        the scalar is clamped on every use, so the raw bytes are what is shared);
        ``public`` is ``X25519(secret, 9)``.
    """
    secret = os.urandom(SECRET_KEY_SIZE)
    return secret, x25519_public(secret)


def x25519_public(secret: bytes) -> bytes:
    """Return ``X25519(secret, 9)``, the public key of ``secret`` (RFC 7748 §6.1).

    The server uses it to check a reconstructed ``c_d^r`` against the advertised
    ``C_d^r`` (DESIGN §3).

    Raises
    ------
    TypeError, ValueError
        ``secret`` is not 32 bytes.
    """
    secret = _check_bytes(secret, SECRET_KEY_SIZE, "secret")
    return nacl.bindings.crypto_scalarmult_base(secret)


def x25519(secret: bytes, peer_public: bytes) -> bytes:
    """Return the raw X25519 shared secret of ``secret`` and ``peer_public``.

    Parameters
    ----------
    secret
        Our 32-byte scalar.
    peer_public
        The peer's 32-byte public key, as relayed.

    Returns
    -------
    bytes
        32 bytes; feed them to :func:`hkdf`, never use them as a key directly.

    Raises
    ------
    AuthenticationError
        The output is all zero, i.e. ``peer_public`` is a low-order point
        (RFC 7748 §6.1: "check whether the output is all zero").
    TypeError, ValueError
        A key is not 32 bytes.
    """
    secret = _check_bytes(secret, SECRET_KEY_SIZE, "secret")
    peer_public = _check_bytes(peer_public, PUBLIC_KEY_SIZE, "peer_public")
    try:
        shared = nacl.bindings.crypto_scalarmult(secret, peer_public)
    except nacl.exceptions.RuntimeError:
        # libsodium itself fails crypto_scalarmult when the output is all zero.
        raise AuthenticationError(_LOW_ORDER) from None
    # Checked again in constant time, so this does not rest on a libsodium detail.
    if hmac.compare_digest(shared, _ALL_ZERO):
        raise AuthenticationError(_LOW_ORDER) from None
    return shared


# ------------------------------------------------------------------------------ HKDF


def hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) through ``cryptography``.

    Parameters
    ----------
    ikm
        Input keying material.
    salt
        The salt; an empty salt is HashLen zero bytes (RFC 5869 §2.2).
    info
        Context information; in this protocol always an :func:`encode` output.
    length
        Output length L, 1 ≤ L ≤ 255·32 (RFC 5869 §2.3).

    Returns
    -------
    bytes
        ``length`` bytes of output keying material.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type, or ``length`` out of range.
    """
    ikm = _check_bytes(ikm, None, "ikm")
    salt = _check_bytes(salt, None, "salt")
    info = _check_bytes(info, None, "info")
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"length: expected int, got {type(length).__name__}")
    if not 1 <= length <= _HKDF_MAX_LENGTH:
        raise ValueError(f"length: expected 1..{_HKDF_MAX_LENGTH}, got {length}")
    kdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info)
    return kdf.derive(ikm)


def share_key(
    e_secret: bytes,
    peer_E: bytes,  # noqa: N803 - E is the name DESIGN §3 gives the public key.
    *,
    transcript: bytes,
    sender: str,
    receiver: str,
) -> bytes:
    """Return the 32-byte key of the share box from ``sender`` to ``receiver``.

    ``HKDF(X25519(e_sender, E_receiver), salt=T, info=encode("share", sender,
    receiver))`` (DESIGN §3). The key is directional: the box from u to v and the box
    from v to u use different keys, so a relay cannot reflect a box back to its
    sender. The sender calls ``share_key(e_u, E_v, ..., sender=u, receiver=v)``; the
    receiver computes the same key as ``share_key(e_v, E_u, ..., sender=u,
    receiver=v)``.

    Parameters
    ----------
    e_secret
        Our 32-byte context key ``e`` (never revealed).
    peer_E
        The peer's advertised 32-byte ``E``.
    transcript
        The context transcript T (32 bytes), the HKDF salt.
    sender, receiver
        Node ids, in the direction of the box.

    Raises
    ------
    AuthenticationError
        ``peer_E`` is a low-order point.
    TypeError, ValueError
        A key or T of the wrong type or length, or ``sender == receiver``.
    """
    transcript = _check_bytes(transcript, DIGEST_SIZE, "transcript")
    sender = _check_id(sender, "sender")
    receiver = _check_id(receiver, "receiver")
    if sender == receiver:
        raise ValueError("sender and receiver must differ")
    shared = x25519(e_secret, peer_E)
    info = encode("share", sender, receiver)
    return hkdf(shared, salt=transcript, info=info, length=SHARE_KEY_SIZE)


def mask_key(
    c_secret: bytes,
    peer_C: bytes,  # noqa: N803 - C is the name DESIGN §3 gives the public key.
    *,
    transcript: bytes,
    round: int,  # noqa: A002 - the protocol's name for r.
    stream: str,
    request_digest: bytes,
    u: str,
    v: str,
) -> bytes:
    """Return the 16-byte pairwise mask key ``k_uv`` of round ``round`` and ``stream``.

    ``HKDF(X25519(c_u^r, C_v^r), salt=T, info=encode("mask", r, stream, D_r,
    min(u, v), max(u, v)))`` with min/max by UTF-8 bytes (DESIGN §3), so u and v
    derive the same key. Binding ``D_r`` means nodes shown different requests get
    masks that do not cancel: garbage, not a leak.

    Parameters
    ----------
    c_secret
        Our 32-byte round key ``c^r``.
    peer_C
        The peer's advertised 32-byte ``C^r``.
    transcript
        The context transcript T (32 bytes).
    round
        The round counter r.
    stream
        The stream name.
    request_digest
        ``D_r`` (32 bytes), computed by this node from the request it received.
    u, v
        The two node ids, in either order.

    Raises
    ------
    AuthenticationError
        ``peer_C`` is a low-order point.
    TypeError, ValueError
        A key, T or ``D_r`` of the wrong type or length, ``u == v``, or a round
        outside [0, 2**64).
    """
    transcript = _check_bytes(transcript, DIGEST_SIZE, "transcript")
    request_digest = _check_bytes(request_digest, DIGEST_SIZE, "request_digest")
    stream = _check_id(stream, "stream")
    u = _check_id(u, "u")
    v = _check_id(v, "v")
    if u == v:
        raise ValueError("u and v must differ")
    # DESIGN §3 orders ids by their UTF-8 bytes (which is also code-point order).
    low, high = sorted((u, v), key=lambda node: node.encode("utf-8"))
    info = encode("mask", round, stream, request_digest, low, high)
    shared = x25519(c_secret, peer_C)
    return hkdf(shared, salt=transcript, info=info, length=MASK_KEY_SIZE)


def self_key(
    seed: bytes,
    *,
    transcript: bytes,
    node: str,
    round: int,  # noqa: A002 - the protocol's name for r.
    stream: str,
) -> bytes:
    """Return the 16-byte self-mask key ``k_u = HKDF(b_u^r, salt=T, info=encode("self",
    u, r, stream))`` (DESIGN §3).

    Parameters
    ----------
    seed
        The node's 16-byte round seed ``b_u^r``.
    transcript
        The context transcript T (32 bytes).
    node
        The node id u that owns the seed.
    round
        The round counter r.
    stream
        The stream name.

    Raises
    ------
    TypeError, ValueError
        A seed or T of the wrong type or length, or a round outside [0, 2**64).
    """
    seed = _check_bytes(seed, SEED_SIZE, "seed")
    transcript = _check_bytes(transcript, DIGEST_SIZE, "transcript")
    node = _check_id(node, "node")
    stream = _check_id(stream, "stream")
    info = encode("self", node, round, stream)
    return hkdf(seed, salt=transcript, info=info, length=MASK_KEY_SIZE)


def seed_commitment(
    seed: bytes,
    *,
    transcript: bytes,
    round: int,  # noqa: A002 - the protocol's name for r.
    node: str,
) -> bytes:
    """Return ``SHA-256(encode("commit", T, r, u, b_u^r))``, sent with the upload.

    The server checks every reconstructed ``b_u^r`` against it (DESIGN §3), which
    catches a tampered share that still decodes to an in-range seed.

    Raises
    ------
    TypeError, ValueError
        A seed or T of the wrong type or length, or a round outside [0, 2**64).
    """
    seed = _check_bytes(seed, SEED_SIZE, "seed")
    transcript = _check_bytes(transcript, DIGEST_SIZE, "transcript")
    node = _check_id(node, "node")
    return hashlib.sha256(encode("commit", transcript, round, node, seed)).digest()


# ------------------------------------------------------------- XChaCha20-Poly1305


def seal(key: bytes, plaintext: bytes, *, aad: bytes) -> bytes:
    """Encrypt with XChaCha20-Poly1305 under a fresh random nonce.

    Parameters
    ----------
    key
        A 32-byte key from :func:`share_key`.
    plaintext
        The bytes to protect.
    aad
        Associated data, from :func:`share_aad`.

    Returns
    -------
    bytes
        ``nonce (24) || ciphertext || tag (16)``.

    Raises
    ------
    TypeError, ValueError
        A key that is not 32 bytes, or non-bytes arguments.

    Notes
    -----
    The 192-bit nonce comes from ``os.urandom``; at that size random nonces do not
    collide in practice (draft-irtf-cfrg-xchacha §3.1), and each share key seals few
    boxes anyway.
    """
    key = _check_bytes(key, SHARE_KEY_SIZE, "key")
    plaintext = _check_bytes(plaintext, None, "plaintext")
    aad = _check_bytes(aad, None, "aad")
    nonce = os.urandom(NONCE_SIZE)
    body = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, aad, nonce, key
    )
    return nonce + body


def open_sealed(key: bytes, box: bytes, *, aad: bytes) -> bytes:
    """Decrypt and authenticate a box made by :func:`seal`.

    Parameters
    ----------
    key
        The 32-byte key.
    box
        ``nonce || ciphertext || tag``, as relayed.
    aad
        The associated data the receiver expects (it rebuilds it itself).

    Returns
    -------
    bytes
        The plaintext.

    Raises
    ------
    AuthenticationError
        The box is too short, not bytes, or its tag does not verify under ``key`` and
        ``aad``. Always the same message, raised ``from None``.
    TypeError, ValueError
        ``key`` is not 32 bytes or ``aad`` is not bytes (the caller's bug).
    """
    key = _check_bytes(key, SHARE_KEY_SIZE, "key")
    aad = _check_bytes(aad, None, "aad")
    try:
        if not isinstance(box, bytes) or len(box) < NONCE_SIZE + _TAG_SIZE:
            raise ValueError
        nonce, body = box[:NONCE_SIZE], box[NONCE_SIZE:]
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            body, aad, nonce, key
        )
    # PyNaCl raises CryptoError for a bad tag; everything must look the same outside.
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise AuthenticationError(_BAD_BOX) from None


def share_aad(
    *,
    kind: str,
    transcript: bytes,
    round: int,  # noqa: A002 - the protocol's name for r.
    sender: str,
    receiver: str,
    x: int,
) -> bytes:
    """Return ``encode("share", kind, T, r, u, v, x)``, the AAD of a share box.

    The receiver rebuilds it from its own view (kind, T, r, the sender, itself and its
    own index x), so a box relayed to the wrong place, round or kind fails to open
    (DESIGN §3).

    Parameters
    ----------
    kind
        ``"c"`` (share of ``c_u^r``) or ``"b"`` (share of ``b_u^r``).
    transcript
        The context transcript T (32 bytes).
    round
        The round counter r.
    sender, receiver
        u and v.
    x
        The receiver's 1-based Shamir index.

    Raises
    ------
    TypeError, ValueError
        An unknown kind, T of the wrong length, ``x < 1`` or a round outside
        [0, 2**64).
    """
    if kind not in _SHARE_KINDS:
        raise ValueError(f"kind: expected 'c' or 'b', got {kind!r}")
    transcript = _check_bytes(transcript, DIGEST_SIZE, "transcript")
    sender = _check_id(sender, "sender")
    receiver = _check_id(receiver, "receiver")
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"x: expected int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"x: expected an index >= 1, got {x}")
    return encode("share", kind, transcript, round, sender, receiver, x)

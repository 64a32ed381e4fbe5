"""Secure aggregation by pairwise masks (Bonawitz et al. 2017, the masking layer of SecAgg).

Each participant i holds an X25519 key pair for one (federation, round, attempt). For every
other participant j it derives a shared 32-byte seed s_ij = HKDF(X25519(sk_i, pk_j), context)
(s_ij = s_ji), expands it with ChaCha20 into a mask m_ij of uint64 words, and sends

    y_i = enc(x_i) + Σ_{j>i} m_ij − Σ_{j<i} m_ij   (mod 2^64),

where enc is a fixed-point encoding (``SCALE_BITS`` fractional bits, two's complement). The
masks cancel in Σ_i y_i, so the coordinator learns the sum of the encoded updates and nothing
else; a single y_i is uniformly distributed mod 2^64 to anyone without the seeds.

Dropouts: there is no Shamir recovery of the seeds here (SecAgg+ has it). If a named participant
does not deliver, the masks it shares with the others do not cancel, the attempt is aborted and
the round restarts with a fresh key set among the survivors; each survivor re-masks the update it
already trained (and paid for) under the new keys, so no privacy cost is charged twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Fractional bits of the fixed-point encoding; |x| must stay below 2^(63 − SCALE_BITS) / n.
SCALE_BITS = 24
_MAX_ABS = float(2 ** (63 - SCALE_BITS - 8))  # room for summing up to 256 participants


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair; ``public`` is the raw 32-byte public key sent in the clear."""

    private: X25519PrivateKey
    public: bytes


def new_keypair() -> KeyPair:
    sk = X25519PrivateKey.generate()
    pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyPair(private=sk, public=pk)


def private_bytes(kp: KeyPair) -> bytes:
    """The raw private key, for the trainer's own durable store (never sent)."""
    return kp.private.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def keypair_from_private(raw: bytes) -> KeyPair:
    sk = X25519PrivateKey.from_private_bytes(raw)
    pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyPair(private=sk, public=pk)


def encode_fixed(x: np.ndarray) -> np.ndarray:
    """Float vector -> uint64 two's-complement fixed point (values clipped to ±2^31)."""
    v = np.clip(np.asarray(x, dtype=np.float64), -_MAX_ABS, _MAX_ABS)
    return np.round(v * (1 << SCALE_BITS)).astype(np.int64).view(np.uint64)


def decode_fixed(s: np.ndarray) -> np.ndarray:
    """uint64 fixed point (e.g. a sum mod 2^64) -> float64."""
    return np.asarray(s, dtype=np.uint64).view(np.int64).astype(np.float64) / (1 << SCALE_BITS)


def pair_seed(kp: KeyPair, peer_public: bytes, *, context: bytes) -> bytes:
    """The 32-byte seed both ends of a pair derive from X25519 + HKDF-SHA256 bound to context."""
    shared = kp.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared)


def prg_words(seed: bytes, n: int) -> np.ndarray:
    """n pseudo-random uint64 words: the ChaCha20 key stream under ``seed``."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (8 * n)), dtype="<u8").astype(np.uint64)


def mask(
    encoded: np.ndarray,
    *,
    me: str,
    kp: KeyPair,
    peers: dict[str, bytes],
    context: bytes,
) -> np.ndarray:
    """y = encoded + Σ_{peer > me} m − Σ_{peer < me} m (mod 2^64); ``peers`` maps every
    participant (``me`` included, skipped) to its public key."""
    y = np.asarray(encoded, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        for peer, pk in sorted(peers.items()):
            if peer == me:
                continue
            m = prg_words(pair_seed(kp, pk, context=context), y.size)
            y = y + m if me < peer else y - m
    return y


def sum_masked(updates: list[np.ndarray]) -> np.ndarray:
    """Σ y_i mod 2^64: the masks cancel once every named participant is in the sum."""
    if not updates:
        raise ValueError("no updates to sum")
    total = np.zeros_like(np.asarray(updates[0], dtype=np.uint64))
    with np.errstate(over="ignore"):
        for u in updates:
            total = total + np.asarray(u, dtype=np.uint64)
    return total


def round_context(federation_id: str, round_no: int, attempt: int) -> bytes:
    return f"fedllm-secagg|{federation_id}|{round_no}|{attempt}".encode()

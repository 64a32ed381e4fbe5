"""Keyed HMAC and AES-256-GCM sealing of text that must never be stored in clear.

The GCM nonce is synthetic: the first 12 bytes of HMAC-SHA256(nonce key, event_id ‖ 0 ‖ text).
The same text of the same event always seals to the same token (so a replay into an empty
database matches the live store), and a nonce repeats only for identical plaintexts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 12
TAG_BYTES = 16


def derive_key(key: bytes, info: str) -> bytes:
    """A 32-byte subkey of `key` for one purpose (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(key)


def text_hmac(key: bytes, text: str) -> str:
    """Hex HMAC-SHA256 of `text` (same construction as fedllm.common.audit.prompt_hmac)."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


class Sealer:
    """Seals text with AES-256-GCM under one key id; the event id is bound as associated data."""

    def __init__(self, key: bytes, key_id: str) -> None:
        if len(key) != 32:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self.key_id = key_id
        self._aead = AESGCM(key)
        self._nonce_key = derive_key(key, "fedllm-audit-nonce")

    def _aad(self, event_id: str) -> bytes:
        return f"{self.key_id}\x00{event_id}".encode()

    def seal(self, event_id: str, text: str) -> str:
        """base64(nonce ‖ ciphertext ‖ tag)."""
        data = text.encode()
        nonce = hmac.new(
            self._nonce_key, event_id.encode() + b"\x00" + data, hashlib.sha256
        ).digest()[:NONCE_BYTES]
        return base64.b64encode(
            nonce + self._aead.encrypt(nonce, data, self._aad(event_id))
        ).decode()

    def open(self, event_id: str, token: str) -> str:
        """The clear text of a token; raises cryptography's InvalidTag if it was altered."""
        raw = base64.b64decode(token)
        nonce, body = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
        return self._aead.decrypt(nonce, body, self._aad(event_id)).decode()


def is_sealed_token(token: str) -> bool:
    """True when `token` is valid base64 long enough to be nonce ‖ ciphertext ‖ tag."""
    try:
        raw = base64.b64decode(token, validate=True)
    except ValueError:
        return False
    return len(raw) >= NONCE_BYTES + TAG_BYTES

"""The adapter registry: trained LoRA adapters as versions a node can serve.

A version is the adapter's bytes (the flat float32 vector of ``lora_model.get_vector``) named by
their sha256, with its training ε per hospital (and the max), δ, its federation and round, the
LoRA shape a node needs to load it, and a status: ``pending`` (published) → ``approved`` by an
admin, or ``rejected``. Files under ``<data_dir>/adapters``:

* ``<hash>.f32`` the bytes, ``<hash>.json`` the version (written atomically, bytes first);
* ``APPROVED`` the hash nodes serve (the newest approval), replaced atomically; a node reads this
  one small file on a timer, so a check costs the same however many versions exist.

Approval re-hashes the stored bytes and refuses a mismatch; a node re-hashes what it loads too.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

Status = Literal["pending", "approved", "rejected"]
POINTER = "APPROVED"


class AdapterError(ValueError):
    """A refused registry operation (unknown version, tampered bytes, wrong state)."""


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    hash: str
    federation_id: str
    round: int
    epsilon_by_hospital: dict[str, float]
    delta: float
    base_model: str  # lora_model's base name: "SmolLM2-135M-Instruct" or "tiny-llama-test"
    lora_rank: int
    lora_seed: int
    status: Status = "pending"
    created_at_ms: int = 0
    decided_at_ms: int = 0
    decided_by: str = ""
    reason: str = ""
    size_bytes: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def epsilon(self) -> float:
        """The training ε: the largest of the hospitals' (each at δ)."""
        return max(self.epsilon_by_hospital.values(), default=0.0)

    @property
    def tiny(self) -> bool:
        return self.base_model == "tiny-llama-test"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class AdapterRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> AdapterRegistry:
        return cls(Path(data_dir) / "adapters")

    def _blob(self, h: str) -> Path:
        return self.root / f"{h}.f32"

    def _meta(self, h: str) -> Path:
        return self.root / f"{h}.json"

    @staticmethod
    def _check_name(h: str) -> str:
        if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            raise AdapterError(f"not an adapter hash: {h!r}")
        return h

    def publish(
        self,
        data: bytes,
        *,
        federation_id: str,
        round: int,
        epsilon_by_hospital: dict[str, float],
        delta: float,
        base_model: str,
        lora_rank: int,
        lora_seed: int,
        expected_hash: str = "",
    ) -> AdapterVersion:
        """Register ``data`` as a pending version (an existing version is returned as is)."""
        h = content_hash(data)
        if expected_hash and expected_hash != h:
            raise AdapterError(f"adapter bytes hash to {h}, not the announced {expected_hash}")
        if not (0 < delta < 1):
            raise AdapterError("delta must be in (0, 1)")
        self.root.mkdir(parents=True, exist_ok=True)
        if self._meta(h).exists():
            return self.get(h)
        _write_atomic(self._blob(h), data)
        version = AdapterVersion(
            hash=h,
            federation_id=federation_id,
            round=int(round),
            epsilon_by_hospital={k: float(v) for k, v in sorted(epsilon_by_hospital.items())},
            delta=float(delta),
            base_model=base_model,
            lora_rank=int(lora_rank),
            lora_seed=int(lora_seed),
            created_at_ms=_now_ms(),
            size_bytes=len(data),
        )
        self._save(version)
        return version

    def _save(self, v: AdapterVersion) -> None:
        _write_atomic(self._meta(v.hash), json.dumps(asdict(v), sort_keys=True).encode())

    def get(self, h: str) -> AdapterVersion:
        path = self._meta(self._check_name(h))
        if not path.exists():
            raise AdapterError(f"no adapter {h}")
        return AdapterVersion(**json.loads(path.read_text()))

    def list(self) -> list[AdapterVersion]:
        if not self.root.exists():
            return []
        out = [AdapterVersion(**json.loads(p.read_text())) for p in self.root.glob("*.json")]
        return sorted(out, key=lambda v: v.created_at_ms)

    def read_verified(self, h: str) -> bytes:
        """The version's bytes, refused unless they hash to ``h``."""
        path = self._blob(self._check_name(h))
        if not path.exists():
            raise AdapterError(f"adapter {h} has no bytes")
        data = path.read_bytes()
        if content_hash(data) != h:
            raise AdapterError(f"adapter {h} is tampered: its bytes hash to {content_hash(data)}")
        return data

    def approve(self, h: str, *, by: str) -> AdapterVersion:
        """Approve a pending version after re-hashing its bytes; nodes then serve it."""
        v = self.get(h)
        if v.status == "rejected":
            raise AdapterError(f"adapter {h} was rejected")
        self.read_verified(h)
        if v.status != "approved":
            v = replace(v, status="approved", decided_at_ms=_now_ms(), decided_by=by)
            self._save(v)
        _write_atomic(self.root / POINTER, h.encode())
        return v

    def reject(self, h: str, *, by: str, reason: str = "") -> AdapterVersion:
        v = replace(
            self.get(h), status="rejected", decided_at_ms=_now_ms(), decided_by=by, reason=reason
        )
        self._save(v)
        if self.current_hash() == h:  # withdrawn: nodes stop serving it at their next check
            (self.root / POINTER).unlink(missing_ok=True)
        return v

    def current_hash(self) -> str | None:
        """The hash nodes serve now, or None (one small read)."""
        try:
            text = (self.root / POINTER).read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

"""Large byte payloads (adapter vectors, masked updates) split into Kafka-sized chunks."""

from __future__ import annotations

#: Well under Kafka's default 1 MiB message limit.
CHUNK_BYTES = 256 * 1024


def split(data: bytes, *, size: int = CHUNK_BYTES) -> list[bytes]:
    """At least one chunk (an empty payload is one empty chunk)."""
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


class Assembler:
    """Collects chunks per key; ``add`` returns the whole payload once every chunk arrived.
    Duplicates (redelivery) are ignored; a chunk count that changes for a key is an error."""

    def __init__(self) -> None:
        self._parts: dict[object, dict[int, bytes]] = {}
        self._count: dict[object, int] = {}

    def add(self, key: object, index: int, count: int, data: bytes) -> bytes | None:
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"bad chunk {index}/{count}")
        if self._count.setdefault(key, count) != count:
            raise ValueError(f"chunk count changed for {key!r}")
        parts = self._parts.setdefault(key, {})
        parts.setdefault(index, data)
        if len(parts) < count:
            return None
        whole = b"".join(parts[i] for i in range(count))
        del self._parts[key], self._count[key]
        return whole

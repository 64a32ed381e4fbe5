"""Serving the approved federated adapter: hot-loaded between requests, answering from the
question alone.

The adapted model is the LoRA base the trainers used (``lora_model.load_adapted`` with the
version's base, rank and seed) with the approved vector set in. A check for a newer approval
(at start, after each request the node handles, and before an adapter answer) reads one small
pointer file at most every ``check_interval_s``; a swap takes the same lock as a generation, so a request in progress finishes on the old weights and the next one gets the new.
An answer reads no record: it is post-processing of a DP-trained model and spends no ε.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedllm.common.adapters import AdapterError, AdapterRegistry, AdapterVersion
from fedllm.common.lora_model import AdaptedModel, from_bytes, load_adapted, set_vector

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdapterAnswer:
    text: str
    tokens: int
    version: AdapterVersion


class AdapterServer:
    def __init__(
        self, registry: AdapterRegistry, *, models_dir: Path, check_interval_s: float = 5.0
    ) -> None:
        self.registry = registry
        self.models_dir = Path(models_dir)
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()  # held by a generation and by a swap
        self._loading = threading.Lock()  # one check at a time
        self._model: AdaptedModel | None = None
        self._shape: tuple[str, int, int] | None = None
        self.version: AdapterVersion | None = None
        self._checked = -float("inf")
        self.swaps = 0

    def refresh(self, *, force: bool = False) -> None:
        """Load a newly approved adapter (or drop a withdrawn one); cheap when nothing changed."""
        now = time.monotonic()
        if not force and now - self._checked < self.check_interval_s:
            return
        if not self._loading.acquire(blocking=False):  # another thread is checking already
            return
        try:
            self._checked = now
            self._refresh()
        finally:
            self._loading.release()

    def _refresh(self) -> None:
        h = self.registry.current_hash()
        if h == (self.version.hash if self.version else None):
            return
        if h is None:
            with self._lock:
                self.version = None
            log.info("adapter withdrawn: serving none")
            return
        try:
            version = self.registry.get(h)
            vec = from_bytes(self.registry.read_verified(h))  # refuses tampered bytes
        except AdapterError as exc:
            log.error("approved adapter not loaded: %s", exc)
            return
        shape = (version.base_model, version.lora_rank, version.lora_seed)
        fresh = None
        if shape != self._shape:  # a different base or LoRA shape: build it outside the lock
            fresh = load_adapted(
                models_dir=self.models_dir,
                tiny=version.tiny,
                rank=version.lora_rank,
                seed=version.lora_seed,
            )
            set_vector(fresh.model, vec)
            fresh.model.eval()
        with self._lock:  # between generations
            if fresh is not None:
                self._model, self._shape = fresh, shape
            else:
                assert self._model is not None
                set_vector(self._model.model, vec)
            self.version = version
            self.swaps += 1
        log.info("serving adapter %s (training ε %.3g)", h, version.epsilon)

    def answer(self, question: str, *, system: str, max_tokens: int) -> AdapterAnswer | None:
        """A greedy answer to the question alone, or None when no adapter is approved."""
        self.refresh()
        if self.version is None and self._loading.locked():
            with self._loading:  # a first load is under way in another thread: wait for it
                pass
        with self._lock:
            if self._model is None or self.version is None:
                return None
            m = self._model
            msgs = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Question: {question}"},
            ]
            ids: Any = m.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True, return_tensors="pt", return_dict=False
            )
            if not isinstance(ids, torch.Tensor):
                ids = torch.as_tensor(ids["input_ids"] if isinstance(ids, dict) else ids)
            with torch.no_grad():
                out = m.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max(1, max_tokens),
                    do_sample=False,
                    pad_token_id=m.pad_id,
                    eos_token_id=m.tokenizer.eos_token_id,
                )
            new = out[0, ids.shape[1] :]
            text = m.tokenizer.decode(new, skip_special_tokens=True).strip()
            return AdapterAnswer(text=text, tokens=int(new.numel()), version=self.version)

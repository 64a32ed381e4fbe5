"""Patient-level DP-SGD on LoRA adapters (peft + Opacus per-sample gradients).

One DP-SGD step (Abadi et al. 2016, with the patient as the privacy unit):

1. Poisson-sample patients: each patient independently with probability q;
2. one forward/backward over all the sampled patients' rows; Opacus' ``GradSampleModule``
   gives the gradient of every row, which are summed per patient (row weights 1/rows, so a
   patient's gradient is the mean over its rows) — all of one patient's notes are one unit;
3. clip each patient's gradient to L2 norm C, sum, add N(0, σ²C²) per coordinate, divide by
   the expected batch q·N (Opacus' convention, so the sum's sensitivity stays C);
4. SGD step on the noisy gradient plus the FedProx proximal gradient μ(w − w_global), which
   depends on public values only and so costs nothing.

The privacy cost of a round is ``steps`` subsampled-Gaussian steps (fedllm.privacy.dpsgd).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedllm.common.lora_model import lora_params, row_losses


@dataclass(frozen=True, slots=True)
class DpSgdConfig:
    """Public parameters of one round of local training."""

    steps: int
    sample_rate: float
    noise_multiplier: float
    clip_norm: float
    learning_rate: float
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if not 0 < self.sample_rate <= 1:
            raise ValueError("sample_rate must be in (0, 1]")
        if self.noise_multiplier < 0 or self.clip_norm <= 0 or self.learning_rate <= 0:
            raise ValueError("noise_multiplier >= 0, clip_norm > 0 and learning_rate > 0")
        if self.prox_mu < 0:
            raise ValueError("prox_mu must be >= 0")


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    update: np.ndarray  # w_local − w_global (float64)
    mean_loss: float  # mean training loss over the steps' batches (a diagnostic)


class PatientDpSgd:
    """Patient-level DP-SGD over one peft model (wrapped once in Opacus' GradSampleModule)."""

    def __init__(self, peft_model: Any, *, pad_id: int) -> None:
        from opacus import GradSampleModule

        self.model = peft_model
        self.gsm = GradSampleModule(peft_model, batch_first=True, loss_reduction="sum")
        self.pad_id = pad_id
        self.params = [p for _, p in lora_params(peft_model)]
        self._gen = torch.Generator().manual_seed(secrets.randbits(63))
        self._rng = np.random.default_rng(secrets.randbits(63))

    def _noisy_grad(
        self, rows: dict[str, torch.Tensor], sampled: list[str], cfg: DpSgdConfig, n_total: int
    ) -> tuple[list[torch.Tensor], float]:
        summed = [torch.zeros_like(p) for p in self.params]
        loss_val = math.nan
        if sampled:
            ids = torch.cat([rows[pid] for pid in sampled])
            owner = torch.cat(
                [
                    torch.full((len(rows[pid]),), i, dtype=torch.long)
                    for i, pid in enumerate(sampled)
                ]
            )
            weight = torch.cat(
                [torch.full((len(rows[pid]),), 1.0 / len(rows[pid])) for pid in sampled]
            )
            self.gsm.train()
            for p in self.params:
                p.grad_sample = None
                p.grad = None
            losses = row_losses(self.gsm, ids, self.pad_id)
            (losses * weight).sum().backward()
            loss_val = float(losses.detach().mean())
            per_patient = []
            for p in self.params:
                gs = p.grad_sample  # (rows, *shape)
                agg = torch.zeros((len(sampled), *p.shape), dtype=gs.dtype)
                agg.index_add_(0, owner, gs)
                per_patient.append(agg.reshape(len(sampled), -1))
                p.grad_sample = None
                p.grad = None
            norms = torch.cat(per_patient, dim=1).norm(dim=1)
            factor = (cfg.clip_norm / (norms + 1e-12)).clamp(max=1.0)
            for i, p in enumerate(self.params):
                summed[i] = (per_patient[i] * factor[:, None]).sum(0).view_as(p)
        denom = cfg.sample_rate * n_total
        grads = []
        for s in summed:
            noise = torch.normal(
                0.0, cfg.noise_multiplier * cfg.clip_norm, size=s.shape, generator=self._gen
            )
            grads.append((s + noise) / denom)
        return grads, loss_val

    def train_round(self, rows: dict[str, torch.Tensor], cfg: DpSgdConfig) -> RoundOutcome:
        """``cfg.steps`` DP-SGD steps from the current (global) adapter; returns the update."""
        if not rows:
            raise ValueError("no patients to train on")
        start = [p.detach().clone() for p in self.params]
        patients = sorted(rows)
        losses: list[float] = []
        for _ in range(cfg.steps):
            pick = self._rng.random(len(patients)) < cfg.sample_rate
            sampled = [pid for pid, keep in zip(patients, pick, strict=True) if keep]
            grads, loss = self._noisy_grad(rows, sampled, cfg, len(patients))
            if not math.isnan(loss):
                losses.append(loss)
            with torch.no_grad():
                for p, g, w0 in zip(self.params, grads, start, strict=True):
                    p.add_(g + cfg.prox_mu * (p - w0), alpha=-cfg.learning_rate)
        update = np.concatenate(
            [
                (p.detach() - w0).reshape(-1).numpy()
                for p, w0 in zip(self.params, start, strict=True)
            ]
        ).astype(np.float64)
        with torch.no_grad():  # leave the model at the global adapter
            for p, w0 in zip(self.params, start, strict=True):
                p.copy_(w0)
        return RoundOutcome(update=update, mean_loss=float(np.mean(losses)) if losses else math.nan)


def clip_update(update: np.ndarray, *, max_norm: float) -> np.ndarray:
    """Scale ``update`` to L2 norm ≤ ``max_norm`` (0 = no clip): bounds one hospital's pull on a
    secure sum, where the coordinator cannot inspect single updates."""
    if max_norm <= 0:
        return update
    n = float(np.linalg.norm(update))
    return update if n <= max_norm else update * (max_norm / n)

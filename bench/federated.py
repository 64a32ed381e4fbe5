"""Federated DP-LoRA: DP-SGD step time vs a non-private step, and round time vs hospitals.

* step: one patient-level DP-SGD step (Opacus per-sample gradients, per-patient clip, noise)
  beside one plain SGD step on the same rows, same model and LoRA; the ratio is what DP costs;
* round: one secure-aggregation round over the embedded broker (join, masked chunked updates,
  secure sum, result) with 2, 3, … hospitals, every trainer in this process.

    python bench/federated.py --quick            # tiny model, 2 and 3 hospitals (< 3 min)
    python bench/federated.py --real             # SmolLM2-135M for the step timing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

from fedllm.common.config import Settings
from fedllm.common.lora_model import load_adapted, lora_params, row_losses
from fedllm.embedded import EmbeddedBroker
from fedllm.federate import build_coordinator, build_trainer, run_all
from fedllm.services.federation.config import FederationConfig
from fedllm.services.node_worker.clinosim_data import ensure_clinosim
from fedllm.services.trainer.dp_lora import DpSgdConfig, PatientDpSgd
from fedllm.services.trainer.notes import notes_by_patient, patient_rows

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".fedllm"


def source(seed: int) -> Path:
    return ensure_clinosim(CACHE / "test-hospitals" / f"seed{seed}", seed=seed, population=20)


def step_times(*, tiny: bool, repeats: int, seq_len: int, max_rows: int) -> dict[str, float]:
    cfg = DpSgdConfig(
        steps=1, sample_rate=1.0, noise_multiplier=1.0, clip_norm=1.0, learning_rate=0.1
    )
    private = load_adapted(models_dir=CACHE / "models", tiny=tiny, rank=4, seed=0)
    plain = load_adapted(models_dir=CACHE / "models", tiny=tiny, rank=4, seed=0)
    rows = patient_rows(
        notes_by_patient(source(11)), private.tokenizer, seq_len=seq_len, max_rows=max_rows
    )
    sgd = PatientDpSgd(private.model, pad_id=private.pad_id)
    batch = torch.cat(list(rows.values()))
    params = [p for _, p in lora_params(plain.model)]
    opt = torch.optim.SGD(params, lr=0.1)

    def dp_step() -> None:
        sgd.train_round(rows, cfg)

    def plain_step() -> None:
        plain.model.train()
        opt.zero_grad()
        row_losses(plain.model, batch, plain.pad_id).mean().backward()
        opt.step()

    out: dict[str, list[float]] = {"dp": [], "plain": []}
    for _ in range(repeats + 1):  # first of each is a warm-up
        for name, fn in (("plain", plain_step), ("dp", dp_step)):
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    dp, pl = statistics.median(out["dp"][1:]), statistics.median(out["plain"][1:])
    return {
        "model": private.name,
        "rows": len(batch),
        "patients": len(rows),
        "seq_len": seq_len,
        "dp_step_s": dp,
        "plain_step_s": pl,
        "ratio": dp / pl,
    }


def round_time(n: int, *, bootstrap: str, tiny: bool) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="fl-bench-"))
    try:
        seeds = [11, 12, 13]
        ids = [f"b{i}" for i in range(n)]
        for i, h in enumerate(ids):
            shutil.copytree(source(seeds[i % 3]), tmp / "hospitals" / h / "clinosim")
        shutil.copytree(source(14), tmp / "federation" / "heldout-14")
        (tmp / "models").mkdir()
        for name in ("smollm2-tokenizer", "smollm2-135m-instruct"):
            (tmp / "models" / name).symlink_to(CACHE / "models" / name)
        settings = Settings(kafka_bootstrap=bootstrap, data_dir=tmp, fetch_max_wait_ms=10)
        cfg = FederationConfig(
            federation_id=f"bench-{uuid.uuid4().hex[:6]}",
            hospitals=tuple(ids),
            min_participants=2,
            max_rounds=1,
            local_steps=1,
            sample_rate=0.5,
            join_timeout_s=60,
            round_deadline_s=300,
            topic_prefix=f"b{uuid.uuid4().hex[:6]}.",
        )
        trainers = [
            build_trainer(
                settings, cfg, h, seed=0, population=20, tiny=tiny, report_train_loss=False
            )
            for h in ids
        ]
        coord = build_coordinator(
            settings,
            cfg,
            tiny=tiny,
            heldout_seed=14,
            population=20,
            store_url=f"sqlite:///{tmp}/rounds.db",
        )
        reports = asyncio.run(run_all(settings, cfg, coord, trainers))
        return {"hospitals": n, "round_s": reports[0].seconds, "status": reports[0].status}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M for the step timing")
    ap.add_argument("--hospitals", default="2,3")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    step = step_times(
        tiny=not args.real,
        repeats=2 if args.quick else 5,
        seq_len=32 if args.real else 64,
        max_rows=1 if args.real else 2,
    )
    print(json.dumps({"bench": "dp_sgd_step", **step}), flush=True)
    with EmbeddedBroker() as broker:
        for n in [int(x) for x in args.hospitals.split(",")]:
            print(
                json.dumps(
                    {"bench": "round", **round_time(n, bootstrap=broker.bootstrap, tiny=True)}
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()

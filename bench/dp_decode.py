"""Released tokens/s of DP decoding (m groups + 1 public prompt, one batched KV-cached forward
per token) beside plain greedy ``model.generate`` of the same model on the same question, in the
same run.

    python bench/dp_decode.py [--groups 4 8 16] [--tokens 32] [--threads 1] [--repeats 2]

Per-token time excludes the prompt prefill: for greedy (t(N tokens) − t(1 token)) / (N − 1),
for DP the decode loop's time after the (separately timed) batched prefill, divided by N (it
includes the noise sampling and the SVT). EOS is ignored so every run releases exactly N tokens; the budget is made large enough
for N paid tokens so that no run stops early (timing, not privacy, is measured here).
The real SmolLM2-135M-Instruct weights are used (cached under --data-dir).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedllm.common.config import Settings  # noqa: E402
from fedllm.privacy.rdp import rho_for_epsilon  # noqa: E402
from fedllm.services.node_worker.answering import Engine  # noqa: E402
from fedllm.services.node_worker.dp_decode import BatchedDecoder, DPDecodeConfig, dp_decode  # noqa: E402
from fedllm.services.node_worker.model import load_model  # noqa: E402

QUESTION = "Which medications are our diabetic patients taking, and how well controlled are they?"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_greedy(lm, prompt: list[int], n: int) -> float:  # noqa: ANN001
    ids = torch.tensor([prompt], device=lm.device)
    _sync()
    t = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    _sync()
    assert out.shape[1] - ids.shape[1] == n
    return time.perf_counter() - t


class TimedDecoder(BatchedDecoder):
    """Records how long the prefill took, to separate it from the per-token loop."""

    prefill_s = 0.0

    def prefill(self, prompts):  # noqa: ANN001, ANN201
        _sync()
        t = time.perf_counter()
        out = super().prefill(prompts)
        _sync()
        self.prefill_s = time.perf_counter() - t
        return out


def time_dp(lm, public: list[int], groups: list[list[int]], n: int, *, svt: bool):  # noqa: ANN001, ANN201
    """(seconds per released token after the prefill, prefill seconds)."""
    cfg = DPDecodeConfig(target_paid_tokens=max(n, 1), use_svt=svt)
    rho = rho_for_epsilon(epsilon=1e4, delta=1e-5)
    dec = TimedDecoder(lm.model, device=lm.device, pad_id=lm.tokenizer.pad_token_id)
    _sync()
    t = time.perf_counter()
    res = dp_decode(
        dec,
        public_prompt=public,
        group_prompts=groups,
        rho=rho,
        delta=1e-5,
        max_tokens=n,
        stop_ids=[],
        config=cfg,
        rng=random.Random(0),
    )
    _sync()
    total = time.perf_counter() - t
    assert len(res.token_ids) == n, res.stop_reason
    return (total - dec.prefill_s) / n, dec.prefill_s


def per_token(timer, n: int, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    """(median per-token seconds excluding prefill, median prefill+first-token seconds)."""
    per, first = [], []
    for _ in range(repeats):
        t1 = timer(1)
        tn = timer(n)
        per.append((tn - t1) / (n - 1))
        first.append(t1)
    return statistics.median(per), statistics.median(first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--notes-chars", type=int, default=300)
    ap.add_argument("--data-dir", type=Path, default=Path(".fedllm"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(data_dir=args.data_dir)
    print(
        f"device={lm.device} torch_threads={torch.get_num_threads()} "
        f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.1f} tokens={args.tokens}"
    )
    settings = Settings(data_dir=args.data_dir)
    public = None
    rows = []
    for m in args.groups:
        eng = Engine(settings, "st_mary", model=lm, groups=m, max_note_chars=args.notes_chars)
        contexts = eng.records.retrieve(QUESTION, per_group=1)
        groups = [eng.encode(QUESTION, c) for c in contexts]
        public = eng.encode(QUESTION, None)
        # Greedy is re-measured beside every m: on a shared machine the load drifts, and the
        # ratio is only meaningful between neighbouring measurements.
        time_greedy(lm, public, 2)  # warm-up
        greedy_pt, greedy_first = per_token(
            lambda n, p=public: time_greedy(lm, p, n), args.tokens, args.repeats
        )
        print(
            f"greedy generate      : {1 / greedy_pt:7.2f} tok/s  "
            f"({greedy_pt * 1000:7.1f} ms/token, prefill+1st {greedy_first:6.2f} s, "
            f"prompt {len(public)} tokens)"
        )
        for svt in (True, False):
            runs = [time_dp(lm, public, groups, args.tokens, svt=svt) for _ in range(args.repeats)]
            pt = statistics.median(r[0] for r in runs)
            first = statistics.median(r[1] for r in runs)
            lens = [len(g) for g in groups]
            label = f"dp m={m:<2} {'svt' if svt else 'all-paid'}"
            print(
                f"{label:<21}: {1 / pt:7.2f} tok/s  ({pt * 1000:7.1f} ms/token, "
                f"prefill {first:6.2f} s, ratio {pt / greedy_pt:5.2f}x greedy, "
                f"prompts {min(lens)}-{max(lens)} tokens)"
            )
            rows.append((m, svt, pt, first))


if __name__ == "__main__":
    main()

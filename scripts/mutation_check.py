"""Mutation check for the privacy mechanism (issue #11, item 7a).

Each named mutation breaks the mechanism the way a plausible bug would. For every one, the
source tree is copied to a temporary folder, the mutation is applied there by replacing source
text (which must occur exactly once), and the tests that guard it are run against the copy.
The check passes only if the unmutated copy passes those tests and **every** mutation makes
at least one of them fail.

    python scripts/mutation_check.py            # all mutations
    python scripts/mutation_check.py --only svt_noise_halved
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from installed_layout import copy_installed_layout  # noqa: E402

T = "tests/node_worker/test_side_channels.py"
A = "tests/node_worker/test_adapter_privacy.py"
R = "tests/node_worker/test_reservation.py"
B = "tests/node_worker/test_batch.py"
L = "tests/node_worker/test_ledger.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation(
        "vote_sensitivity_g",
        "fedllm/services/node_worker/dp_decode.py",
        "sens = math.sqrt(2.0) * g",
        "sens = 1.0 * g",
        (f"{T}::test_vote_sensitivity_covers_the_worst_neighbour",),
    ),
    Mutation(
        "svt_noise_halved",
        "fedllm/services/node_worker/dp_decode.py",
        "scale=4 * cal.granularity / cal.eps_svt",
        "scale=2 * cal.granularity / cal.eps_svt",
        (f"{T}::test_svt_noise_scales_match_lyu_su_li",),
    ),
    Mutation(
        "notes_in_public_prompt",
        "fedllm/services/node_worker/answering.py",
        "public_prompt = self.encode(question, None)",
        "public_prompt = self.encode(question, [n for c in contexts for n in c][:1])",
        (f"{T}::test_public_prompt_used_by_the_engine_is_record_free",),
    ),
    Mutation(
        "unclipped_votes",
        "fedllm/services/node_worker/dp_decode.py",
        "    v = np.clip(np.asarray(votes, dtype=np.int64), 0, granularity)\n",
        "    return np.asarray(votes, dtype=np.int64)\n",
        (f"{T}::test_votes_are_clipped_to_l1_g",),
    ),
    Mutation(
        "bm25_global_statistics",
        "fedllm/services/node_worker/records.py",
        "        self.indexes = [GroupIndex(g) for g in self.partition]\n",
        "        self.indexes = [GroupIndex(g) for g in self.partition]\n"
        "        _all = GroupIndex([n for g in self.partition for n in g])\n"
        "        for _idx in self.indexes:\n"
        "            _idx._idf, _idx._avg = _all._idf, _all._avg\n",
        (f"{T}::test_retrieval_statistics_are_per_group",),
    ),
    Mutation(
        "temperature_unchecked",
        "fedllm/services/node_worker/dp_decode.py",
        "    t = float(temperature)\n    if not (t == 0.0",
        "    t = float(temperature)\n    if False and not (t == 0.0",
        (f"{T}::test_temperature_outside_public_range_fails_closed_and_charged",),
    ),
    Mutation(
        "public_row_in_shared_batch",
        "fedllm/services/node_worker/dp_decode.py",
        "        pub = self.public.prefill([list(public_prompt)])[0]\n"
        "        return pub, self.groups.prefill([list(p) for p in group_prompts])\n",
        "        out = self.groups.prefill([list(public_prompt), *map(list, group_prompts)])\n"
        "        return out[0], out[1:]\n",
        (f"{T}::test_public_row_runs_alone_and_groups_in_one_fixed_shape",),
    ),
    Mutation(  # the 0-ε adapter answer must be post-processing: the notes never reach it
        "adapter_reads_notes",
        "fedllm/services/node_worker/answering.py",
        "        ans = self.adapters.answer(question, system=SYSTEM_PROMPT, max_tokens=max_tokens)\n",
        "        notes = self.records.retrieve(question, per_group=1)\n"
        "        question = '\\n'.join(n.text[:200] for g in notes for n in g) + question\n"
        "        ans = self.adapters.answer(question, system=SYSTEM_PROMPT, max_tokens=max_tokens)\n",
        (
            f"{A}::test_adapter_answer_reads_no_record",
            f"{A}::test_adapter_answer_is_the_same_at_hospitals_with_different_records",
        ),
    ),
    Mutation(  # the cohort size an answer scanned depends on the records: it never leaves
        "record_count_published",
        "fedllm/services/node_worker/service.py",
        "    for k in ENGINE_FIELDS:\n",
        '    for k in (*ENGINE_FIELDS, "records_used"):\n',
        (f"{R}::test_a_published_result_carries_no_record_count_and_no_timing",),
    ),
    Mutation(  # the filter of a batched query misses the charges made earlier in its batch
        "batch_filter_reads_committed_state",
        "fedllm/services/node_worker/ledger.py",
        'public figures alone)."""\n        with self._conn() as conn:',
        'public figures alone)."""\n        with self.engine.connect() as conn:',
        (f"{B}::test_a_batch_answers_exactly_as_one_after_the_other",),
    ),
    Mutation(  # a release row is found by request alone: a hospital re-sends another's release
        "release_key_ignores_hospital",
        "fedllm/services/node_worker/ledger.py",
        '    releases.c.hospital_id == bindparam("k_hospital"),\n',
        "",
        (f"{L}::test_hospitals_sharing_one_store_keep_their_own_releases",),
    ),
    Mutation(  # a batch's mechanisms run before its draws and charges are committed
        "batch_mechanisms_before_commit",
        "fedllm/services/node_worker/answering.py",
        "            staged = [self._stage(r) for r in requests]\n        return",
        "            staged = [self._stage(r) for r in requests]\n            return",
        (f"{B}::test_a_batch_draws_and_charges_before_any_mechanism_runs",),
    ),
)


def _copy_tree(dst: Path) -> None:
    """The package as it installs, so that with PYTHONPATH=dst every import is the copy's."""
    copy_installed_layout(dst, with_tests=True)


def _run_tests(root: Path, tests: tuple[str, ...]) -> bool:
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "PYTHONDONTWRITEBYTECODE": "1",
        "FEDLLM_TEST_CACHE": os.environ.get("FEDLLM_TEST_CACHE", str(REPO / ".fedllm")),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "", *tests],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="names of mutations to run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        guards = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        if not _run_tests(root, guards):
            print("the guarding tests fail on the unmutated tree: nothing to check")
            return 1
        ok = True
        for m in chosen:
            target = root / m.path
            text = target.read_text()
            if text.count(m.old) != 1:
                print(f"{m.name:28s} source text not found exactly once in {m.path}")
                ok = False
                continue
            target.write_text(text.replace(m.old, m.new))
            try:
                caught = not _run_tests(root, m.tests)
            finally:
                target.write_text(text)
            print(f"{m.name:28s} {'caught' if caught else 'SURVIVED'}", flush=True)
            ok &= caught
    print("all mutations caught" if ok else "mutation check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Pairwise-mask secure aggregation: one masked update reveals nothing useful, the sum unmasks."""

from __future__ import annotations

import numpy as np
import pytest

from fedllm.common import secagg

pytestmark = pytest.mark.federated


def _masked(updates: dict[str, np.ndarray], context: bytes = b"ctx"):
    keys = {h: secagg.new_keypair() for h in updates}
    pubs = {h: k.public for h, k in keys.items()}
    return {
        h: secagg.mask(secagg.encode_fixed(x), me=h, kp=keys[h], peers=pubs, context=context)
        for h, x in updates.items()
    }


def test_masked_sum_unmasks_exactly() -> None:
    rng = np.random.default_rng(0)
    ups = {h: rng.normal(size=5000) * 0.01 for h in ("a", "b", "c", "d")}
    masked = _masked(ups)
    total = secagg.decode_fixed(secagg.sum_masked(list(masked.values())))
    exact = secagg.decode_fixed(secagg.sum_masked([secagg.encode_fixed(x) for x in ups.values()]))
    assert np.array_equal(total, exact)  # bit-for-bit: masks cancel mod 2^64
    assert np.max(np.abs(total - sum(ups.values()))) < 4 * 2.0**-secagg.SCALE_BITS


def test_single_masked_update_reveals_nothing_useful() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=20000) * 0.01
    ups = {"a": x, "b": rng.normal(size=x.size) * 0.01, "c": rng.normal(size=x.size) * 0.01}
    y = _masked(ups)["a"]
    decoded = secagg.decode_fixed(y)
    # uncorrelated with the true update, and of the scale of uniform words, not of the update
    assert abs(np.corrcoef(decoded, x)[0, 1]) < 0.05
    assert np.median(np.abs(decoded)) > 1e6 * np.median(np.abs(x))
    # the top bit is a fair coin: the words look uniform mod 2^64
    top = (y >> np.uint64(63)).astype(np.float64)
    assert abs(top.mean() - 0.5) < 0.02


def test_missing_participant_leaves_sum_masked() -> None:
    rng = np.random.default_rng(2)
    ups = {h: rng.normal(size=1000) * 0.01 for h in ("a", "b", "c")}
    masked = _masked(ups)
    partial = secagg.decode_fixed(secagg.sum_masked([masked["a"], masked["b"]]))
    assert np.max(np.abs(partial - (ups["a"] + ups["b"]))) > 1.0


def test_pair_seed_is_symmetric_and_context_bound() -> None:
    a, b = secagg.new_keypair(), secagg.new_keypair()
    assert secagg.pair_seed(a, b.public, context=b"r1") == secagg.pair_seed(
        b, a.public, context=b"r1"
    )
    assert secagg.pair_seed(a, b.public, context=b"r1") != secagg.pair_seed(
        a, b.public, context=b"r2"
    )
    again = secagg.keypair_from_private(secagg.private_bytes(a))
    assert again.public == a.public


def test_fixed_point_round_trip_negative_values() -> None:
    x = np.array([-1.5, 0.0, 2.25, -1e-6])
    assert np.allclose(secagg.decode_fixed(secagg.encode_fixed(x)), x, atol=2.0**-23)

"""The ρ a node spends comes from the routed request (`reserved_rho`, the accountant's), derived
from ε only for a legacy record; and what the node writes says what it is (`kind`)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedllm.common.config import Settings
from fedllm.common.kafka import now_ms
from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant
from fedllm.privacy.rdp import rho_for_epsilon
from fedllm.services.node_worker.fields import AnswerFields, failed
from fedllm.services.node_worker.reservation import reservation_rho
from fedllm.services.node_worker.service import result_record
from tests.node_worker.test_fanout import DELTA, routed

if TYPE_CHECKING:  # torch: imported by the tests that build an engine, not at collection
    from fedllm.services.node_worker.answering import Engine
    from fedllm.services.node_worker.model import LoadedModel


def test_the_carried_rho_is_used_and_only_a_legacy_record_derives_it() -> None:
    assert reservation_rho(reserved_rho=0.004, epsilon=1.0, delta=DELTA) == 0.004
    legacy = reservation_rho(reserved_rho=0.0, epsilon=1.0, delta=DELTA)
    assert legacy == rho_for_epsilon(epsilon=1.0, delta=DELTA)
    # the legacy derivation is the accountant's own
    assert legacy == RdpAccountant().query_rho(epsilon=1.0, delta=DELTA)
    for bad in (-1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match="reserved rho"):
            reservation_rho(reserved_rho=bad, epsilon=1.0, delta=DELTA)


@pytest.fixture
def engine(hospital_data_dir: Path, tiny: LoadedModel) -> Engine:
    from fedllm.services.node_worker.answering import Engine

    return Engine(
        Settings(data_dir=hospital_data_dir), "st_mary", model=tiny, groups=4, rng=random.Random(5)
    )


def test_the_engine_spends_the_carried_rho(engine: Engine) -> None:
    small = 0.25 * rho_for_epsilon(epsilon=1.0, delta=DELTA)
    for share, parts in ((1.0, 1), (0.5, 2)):
        request = dict(routed({"op": "count"}, share=share, parts=parts), reserved_rho=small)
        out = engine.answer(request)
        assert out["status"] == ("partial" if parts > 1 else "ok"), out
        spent = PrivacyCurve(out["rdp_orders"], out["rdp_epsilons"])
        assert spent.rho_upper() == pytest.approx(share * small, rel=1e-9)
    # a legacy record (no reserved_rho): the whole ρ(ε), as before
    out = engine.answer(routed({"op": "count"}))
    spent = PrivacyCurve(out["rdp_orders"], out["rdp_epsilons"])
    assert spent.rho_upper() == pytest.approx(rho_for_epsilon(epsilon=1.0, delta=DELTA), rel=1e-9)
    bad = engine.answer(dict(routed({"op": "count"}), reserved_rho=-1.0))
    assert bad["status"] == "failed" and "invalid reservation" in bad["reason"]


def test_node_records_say_answer_or_part() -> None:
    whole, part = routed({"op": "count"}), routed({"op": "count"}, share=0.5, parts=2)
    for fields in (failed("boom"), {"status": "ok", "is_private": True}):
        assert (
            result_record(whole, fields, hospital_id="st_mary", started_ms=now_ms())["kind"]
            == "answer"
        )
        # a part's failure is still a part: it never ends the request at the accountant
        assert (
            result_record(part, fields, hospital_id="st_mary", started_ms=now_ms())["kind"]
            == "part"
        )


def test_the_published_engine_fields_are_the_answer_fields_but_records_used() -> None:
    from fedllm.services.node_worker.fields import ENGINE_FIELDS

    assert set(ENGINE_FIELDS) == set(AnswerFields.__optional_keys__) - {"records_used"}


def test_a_published_result_carries_no_record_count_and_no_timing() -> None:
    """The cohort size an answer scanned and the time it took depend on the records: the node's
    published record carries neither, whatever the engine's fields hold."""
    fields: AnswerFields = {"status": "ok", "is_private": True, "records_used": 123}
    rec = result_record(routed({"op": "count"}), fields, hospital_id="st_mary", started_ms=1)
    assert rec["records_used"] == 0
    assert rec["model_time_ms"] == 0.0 and rec["processing_time_ms"] == 0.0

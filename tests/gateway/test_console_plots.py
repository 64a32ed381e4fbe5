"""Ledger history and the server-rendered SVG charts (pure)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from fedllm.common.config import Settings
from fedllm.services.gateway.console_plots import LedgerHistory, line_chart


def status(dept: str, remaining: float, window_start: int = 0) -> dict:
    return {
        "department_remaining_epsilon": remaining,
        "window_start": window_start,
        "window_seconds": 86_400,
    }


def test_history_samples_spent_epsilon_and_room_at_most_once_per_interval() -> None:
    settings = Settings(jwt_secret="x" * 40)
    hist = LedgerHistory(interval_s=10, capacity=3)
    for i, remaining in enumerate([15.0, 14.0, 12.5, 11.0]):
        hist.sample(
            settings,
            {"cardiology": status("cardiology", remaining)},
            {"st_mary": {"budget_room": 4 - i}, "quiet": {"budget_room": -1}},
            now_s=100.0 + 10 * i,
        )
        hist.sample(settings, {}, {}, now_s=101.0 + 10 * i)  # within the interval: skipped
    assert len(hist.samples) == 3  # bounded
    cardio = hist.series(1)["cardiology"]
    assert [v for _, v in cardio] == [1.0, 2.5, 4.0]
    assert hist.series(1)["general"][-1][1] == 0.0  # no snapshot: nothing spent
    assert [v for _, v in hist.series(2)["st_mary"]] == [3.0, 2.0, 1.0]
    assert "quiet" not in hist.series(2)  # unknown room is not plotted
    hist.sample(settings, {"cardiology": status("cardiology", 0.0)}, {}, now_s=200_000.0)
    assert hist.series(1)["cardiology"][-1][1] == 0.0  # a spent window's snapshot is stale


def test_chart_is_accessible_svg_with_escaped_names() -> None:
    svg = line_chart(
        {"<script>": [(0.0, 1.0), (10.0, 2.0)], "b": [(5.0, 3.0)]},
        title="T & U",
        y_label="ε",
        y_max=4.0,
        chart_id="c1",
    )
    root = ET.fromstring(svg)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    assert root.get("role") == "img" and root.get("aria-labelledby") == "c1-t c1-d"
    assert root.find(f"{ns}title").text == "T & U"
    assert "<script>: latest 2.00" in root.find(f"{ns}desc").text
    assert "<script>" not in svg.replace("&lt;script&gt;", "")
    assert len(root.findall(f"{ns}polyline")) == 1 and len(root.findall(f"{ns}circle")) == 1
    empty = ET.fromstring(line_chart({}, title="none", y_label="x"))
    assert "no samples yet" in "".join(empty.itertext())

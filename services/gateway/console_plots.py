"""Ledgers over time for the web console: a bounded sample history and inline SVG line charts
rendered on the server (no browser library, nothing loaded from elsewhere).

What is plotted is what the gateway already serves: department ε spent (from the accountant's
BudgetStatus snapshots, public to privacy officers) and each hospital's coarse budget-room level
from its heartbeats (0 exhausted … 4 most room; public by design).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from html import escape
from typing import Any

from fedllm.common.config import Settings
from fedllm.schemas.records import BudgetStatus, NodeHeartbeat

PALETTE = ("#1b6ca8", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0f766e", "#a16207")


@dataclass
class LedgerHistory:
    """Samples (time s, department spent ε, hospital budget-room level), at most `capacity`."""

    interval_s: float = 10.0
    capacity: int = 720
    samples: deque[tuple[float, dict[str, float], dict[str, float]]] = field(
        default_factory=lambda: deque(maxlen=720)
    )

    def __post_init__(self) -> None:
        self.samples = deque(self.samples, maxlen=self.capacity)

    def sample(
        self,
        settings: Settings,
        departments: dict[str, BudgetStatus],
        nodes: Mapping[str, NodeHeartbeat],
        *,
        now_s: float,
    ) -> None:
        """Append the current ledgers (at most one sample per `interval_s`)."""
        if self.samples and now_s - self.samples[-1][0] < self.interval_s:
            return
        limits = settings.budget.department_epsilon
        spent: dict[str, float] = {}
        for dept, limit in limits.items():
            status = departments.get(dept)
            current = (
                status is not None and status["window_start"] + status["window_seconds"] > now_s
            )
            remaining = status["department_remaining_epsilon"] if status and current else limit
            spent[dept] = max(0.0, float(limit) - float(remaining))
        room = {
            h: float(rec.get("budget_room", -1))
            for h, rec in nodes.items()
            if int(rec.get("budget_room", -1)) >= 0
        }
        self.samples.append((now_s, spent, room))

    def series(self, which: int) -> dict[str, list[tuple[float, float]]]:
        """`which` 1: departments, 2: hospitals; name -> [(t, value)]."""
        out: dict[str, list[tuple[float, float]]] = {}
        for sample in self.samples:
            values: dict[str, float] = sample[which]  # type: ignore[assignment]
            for name, value in values.items():
                out.setdefault(name, []).append((sample[0], value))
        return out


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    y_label: str,
    y_max: float | None = None,
    width: int = 640,
    height: int = 260,
    chart_id: str = "chart",
) -> str:
    """An accessible SVG line chart (role=img, <title>/<desc>, legend in text)."""
    left, right, top, bottom = 56, 150, 28, 36
    pw, ph = width - left - right, height - top - bottom
    points = [p for pts in series.values() for p in pts]
    t0 = min((p[0] for p in points), default=0.0)
    t1 = max((p[0] for p in points), default=1.0)
    top_value = y_max if y_max is not None else max((p[1] for p in points), default=1.0)
    top_value = top_value if top_value > 0 else 1.0
    span = (t1 - t0) or 1.0

    def xy(t: float, v: float) -> tuple[float, float]:
        return left + (t - t0) / span * pw, top + ph - min(v, top_value) / top_value * ph

    summary = "; ".join(f"{name}: latest {pts[-1][1]:.2f}" for name, pts in sorted(series.items()))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" id="{escape(chart_id)}" '
        f'aria-labelledby="{escape(chart_id)}-t {escape(chart_id)}-d" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
        f'<title id="{escape(chart_id)}-t">{escape(title)}</title>',
        f'<desc id="{escape(chart_id)}-d">{escape(summary or "no samples yet")}</desc>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#777"/>',
        f'<text x="{left}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for i in range(5):
        v = top_value * i / 4
        _, y = xy(t0, v)
        parts.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:.2g}</text>'
        )
    parts.append(
        f'<text x="14" y="{top + ph / 2:.0f}" font-size="11" '
        f'transform="rotate(-90 14 {top + ph / 2:.0f})" text-anchor="middle">{escape(y_label)}</text>'
    )
    for label, t in (("start", t0), ("now", t1)):
        x, _ = xy(t, 0)
        stamp = time.strftime("%H:%M:%S UTC", time.gmtime(t)) if points else label
        anchor = "start" if label == "start" else "end"
        parts.append(
            f'<text x="{x:.1f}" y="{height - 12}" font-size="11" text-anchor="{anchor}">'
            f"{escape(stamp)}</text>"
        )
    for i, (name, pts) in enumerate(sorted(series.items())):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, v) for t, v in pts))
        if len(pts) == 1:
            x, y = xy(*pts[0])
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
        else:
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'
            )
        ly = top + 14 + i * 16
        parts.append(
            f'<rect x="{left + pw + 10}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
        )
        parts.append(
            f'<text x="{left + pw + 24}" y="{ly}" font-size="11">'
            f"{escape(name)} ({pts[-1][1]:.2f})</text>"
        )
    if not points:
        parts.append(
            f'<text x="{left + pw / 2:.0f}" y="{top + ph / 2:.0f}" font-size="12" '
            f'text-anchor="middle">no samples yet</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


async def sample_forever(history: LedgerHistory, sample: Any) -> None:
    """Call `sample()` every `history.interval_s` (a background task of the app)."""
    while True:
        with contextlib.suppress(Exception):
            sample()
        await asyncio.sleep(history.interval_s)

"""The aggregates library: one answer/release format, one combiner, one renderer, used by the
node worker (which answers a query on its records), the router (which combines a fan-out's
parts) and ``scripts/utility_report.py`` (which measures that same combination).

- :mod:`~fedllm.common.aggregates.release`: :class:`AggregateAnswer` (one hospital's DP
  release), its wire form in ``aggregate_json`` and the fan-out :class:`Part` read back from an
  InferenceResult;
- :mod:`~fedllm.common.aggregates.combination`: :func:`combine_parts` (post-processing, and the
  composed privacy curve);
- :mod:`~fedllm.common.aggregates.rendering`: the user-facing texts.

The query grammar is :mod:`fedllm.common.aggregate_query`; the DP release itself (noise on the
hospital's records) is the node's (``services/node_worker/aggregate.py``). Pure: no I/O.
"""

from fedllm.common.aggregates.combination import Combined, combine_parts, total_curve
from fedllm.common.aggregates.release import (
    AggregateAnswer,
    Part,
    parse_part,
    part_curve,
    part_of,
    release_of,
)
from fedllm.common.aggregates.rendering import describe, render_answer, render_combined

__all__ = [
    "AggregateAnswer",
    "Combined",
    "Part",
    "combine_parts",
    "describe",
    "parse_part",
    "part_curve",
    "part_of",
    "release_of",
    "render_answer",
    "render_combined",
    "total_curve",
]

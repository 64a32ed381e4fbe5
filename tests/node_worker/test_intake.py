"""The node's intake queue: priority order, FIFO within a priority, safe commit offsets."""

from __future__ import annotations

from fedllm.services.node_worker.intake import IntakeQueue, priority_of


def test_high_overtakes_queued_normal_and_low_fifo_within_priority() -> None:
    q: IntakeQueue[str] = IntakeQueue()
    for offset, (prio, name) in enumerate(
        [("low", "l1"), ("normal", "n1"), ("normal", "n2"), ("high", "h1"), ("low", "l2")]
    ):
        q.push("p0", offset, prio, name)
    first = q.pop()
    q.push("p0", 5, "high", "h2")  # arrives while the queue still holds normal and low work
    order = [first.item] + [q.pop().item for _ in range(len(q))]
    assert order == ["h1", "h2", "n1", "n2", "l1", "l2"]


def test_commit_offset_never_passes_unanswered_work() -> None:
    q: IntakeQueue[str] = IntakeQueue()
    q.push("p0", 10, "low", "a")
    q.push("p0", 11, "high", "b")
    q.push("p1", 3, "normal", "c")
    b = q.pop()
    assert b.item == "b"
    assert q.done("p0", 11) == 10  # 10 is still queued: commit must stay at 10
    assert q.done("p0", 11) is None  # nothing new to commit
    assert q.pop().item == "c" and q.done("p1", 3) == 4  # normal before low
    assert q.pop().item == "a" and q.done("p0", 10) == 12  # everything up to 11 answered


def test_revoked_partitions_are_dropped() -> None:
    q: IntakeQueue[str] = IntakeQueue()
    q.push("p0", 0, "normal", "a")
    q.push("p1", 0, "high", "b")
    assert q.drop({"p1"}) == 1
    assert len(q) == 1 and q.pop().item == "a"


def test_priority_of_defaults_to_normal() -> None:
    assert priority_of({"request": {"priority": "high"}}) == "high"
    assert priority_of({"request": {"priority": "urgent"}}) == "normal"
    assert priority_of({}) == "normal" and priority_of(None) == "normal"

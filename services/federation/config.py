"""Public parameters of one federation (all of them go out in the round announcements)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class FederationConfig:
    federation_id: str
    hospitals: tuple[str, ...]  # hospitals invited to every round
    min_participants: int = 2
    max_rounds: int = 3
    convergence_threshold: float = 0.0  # stop when ‖Δ global‖₂ falls below this (0 = never)
    join_timeout_s: float = 30.0
    round_deadline_s: float = 300.0  # per-round deadline for the (masked) updates
    rule: str = "fedavg"  # fedavg | median | trimmed_mean | krum (robust rules: secure=False)
    secure: bool = True
    local_steps: int = 2
    sample_rate: float = 0.5
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    learning_rate: float = 0.5
    prox_mu: float = 0.0
    update_clip: float = 0.0
    lora_rank: int = 4
    seq_len: int = 64
    seed: int = 0
    topic_prefix: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.min_participants < 1:
            raise ValueError("min_participants must be >= 1")
        if self.secure and self.rule != "fedavg":
            raise ValueError(
                "robust rules need each update; with secure aggregation the coordinator sees "
                "only the sum: use rule=fedavg with update_clip, or secure=False"
            )
        if self.secure and self.min_participants < 2:
            raise ValueError("a secure sum of one update is that update: min_participants >= 2")
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be >= 1")


def topic_names(prefix: str = "") -> tuple[str, str, str]:
    """(rounds, updates, results) topics, optionally prefixed (tests use unique names)."""
    from fedllm.common import topics

    return (
        prefix + topics.FL_ROUNDS,
        prefix + topics.FL_UPDATES,
        prefix + topics.FL_RESULTS,
    )

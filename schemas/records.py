"""Typed records for the Avro contracts in this package: one TypedDict per `.avsc` record, named
as the Avro record (fastavro reads and writes plain dicts, so these are the dicts' types).

Typing rules (checked against the `.avsc` files by tests/test_schema_records.py):
string → str, bytes → bytes, int/long → int, float/double → float, boolean → bool,
array<X> → list[X], map<X> → dict[str, X], ["null", X] → X | None, a named record → its class.
A field with an Avro default is `NotRequired`: a producer may leave it out (the codec writes the
default), while a decoded record always has every field. A field without a default is required,
and so is a `bytes` field even with a default: fastavro cannot write a bytes default (given as a
JSON string), so a producer must always set it.
"""

from typing import NotRequired, TypedDict


class InferenceRequest(TypedDict):
    request_id: str
    user_id: str
    role: str
    department: str
    kind: NotRequired[str]
    prompt: str
    max_tokens: int
    temperature: float
    epsilon: float
    delta: float
    require_consensus: NotRequired[bool]
    priority: NotRequired[str]
    hospitals: NotRequired[list[str]]
    allowed_regions: NotRequired[list[str]]
    source_address: NotRequired[str]
    created_at_ms: int
    deadline_ms: int
    use_adapter: NotRequired[bool]
    grants: NotRequired[dict[str, str]]


class BudgetDecision(TypedDict):
    request_id: str
    approved: bool
    reason: NotRequired[str]
    reserved_epsilon: float
    delta: float
    remaining_user_epsilon: float
    remaining_department_epsilon: float
    decided_at_ms: int
    request: InferenceRequest
    reserved_rho: NotRequired[float]


class RoutedRequest(TypedDict):
    request_id: str
    hospital_id: str
    attempt: int
    reserved_epsilon: float
    delta: float
    deadline_ms: int
    routed_at_ms: int
    request: InferenceRequest
    budget_share: NotRequired[float]
    parts: NotRequired[int]
    reserved_rho: NotRequired[float]


class InferenceResult(TypedDict):
    request_id: str
    user_id: str
    department: str
    status: str
    reason: NotRequired[str]
    response: NotRequired[str]
    node_id: NotRequired[str]
    attempt: NotRequired[int]
    is_private: NotRequired[bool]
    privacy_cost: NotRequired[float]
    delta: NotRequired[float]
    rdp_orders: NotRequired[list[float]]
    rdp_epsilons: NotRequired[list[float]]
    remaining_budget: NotRequired[float]
    tokens: NotRequired[int]
    records_used: NotRequired[int]
    model_time_ms: NotRequired[float]
    processing_time_ms: NotRequired[float]
    finished_at_ms: int
    aggregate_json: NotRequired[str]
    consensus_reached: NotRequired[bool]
    adapter_hash: NotRequired[str]
    adapter_epsilon: NotRequired[float]
    confidence_score: NotRequired[float | None]
    kind: NotRequired[str]


class NodeHeartbeat(TypedDict):
    hospital_id: str
    departments: list[str]
    queue_depth: int
    in_flight: int
    recent_latency_ms: float
    model: str
    device: NotRequired[str]
    healthy: bool
    sent_at_ms: int
    queue_by_priority: NotRequired[dict[str, int]]
    ewma_latency_ms: NotRequired[float]
    error_rate: NotRequired[float]
    budget_room: NotRequired[int]
    data_version: NotRequired[str]


class AuditEvent(TypedDict):
    event_id: str
    action: str
    service: str
    request_id: NotRequired[str]
    user_id: NotRequired[str]
    role: NotRequired[str]
    department: NotRequired[str]
    source_address: NotRequired[str]
    hospital_id: NotRequired[str]
    records_used: NotRequired[int]
    outcome: NotRequired[str]
    reason: NotRequired[str]
    epsilon: NotRequired[float]
    delta: NotRequired[float]
    rdp_summary: NotRequired[str]
    prompt_hmac: NotRequired[str]
    occurred_at_ms: int
    details: NotRequired[dict[str, str]]


class BudgetStatus(TypedDict):
    user_id: str
    department: str
    window_start: int
    window_seconds: int
    delta: float
    user_limit_epsilon: float
    user_spent_epsilon: float
    user_remaining_epsilon: float
    department_limit_epsilon: float
    department_remaining_epsilon: float
    updated_at_ms: int


class BudgetAdjustment(TypedDict):
    adjustment_id: str
    action: str
    scope: str
    subject: str
    reason: NotRequired[str]
    actor_user_id: str
    actor_role: str
    source_address: NotRequired[str]
    requested_at_ms: int


class ControlCommand(TypedDict):
    command_id: str
    action: str
    target: NotRequired[str]
    value: NotRequired[str]
    reason: NotRequired[str]
    actor_user_id: str
    actor_role: str
    issued_at_ms: int


class FlParticipant(TypedDict):
    hospital_id: str
    public_key: bytes


class FlRoundAnnouncement(TypedDict):
    federation_id: str
    round: int
    attempt: int
    phase: str
    deadline_ms: int
    participants: NotRequired[list[FlParticipant]]
    local_steps: int
    sample_rate: float
    noise_multiplier: float
    clip_norm: float
    learning_rate: float
    prox_mu: NotRequired[float]
    update_clip: NotRequired[float]
    secure: NotRequired[bool]
    lora_rank: NotRequired[int]
    seq_len: NotRequired[int]
    seed: NotRequired[int]
    sent_at_ms: int


class FlClientUpdate(TypedDict):
    federation_id: str
    round: int
    attempt: int
    hospital_id: str
    kind: str
    public_key: bytes
    chunk_index: NotRequired[int]
    chunk_count: NotRequired[int]
    payload: bytes
    epsilon_spent: NotRequired[float]
    train_loss: NotRequired[float]
    sent_at_ms: int


class FlRoundResult(TypedDict):
    federation_id: str
    round: int
    attempt: int
    status: str
    participants: NotRequired[list[str]]
    chunk_index: NotRequired[int]
    chunk_count: NotRequired[int]
    payload: bytes
    adapter_hash: NotRequired[str]
    update_norm: NotRequired[float]
    heldout_loss: NotRequired[float]
    epsilon_by_hospital: NotRequired[dict[str, float]]
    sent_at_ms: int


# Every record class by its Avro name (the codec's short name).
RECORDS: dict[str, type] = {
    c.__name__: c
    for c in (
        InferenceRequest,
        BudgetDecision,
        RoutedRequest,
        InferenceResult,
        NodeHeartbeat,
        AuditEvent,
        BudgetStatus,
        BudgetAdjustment,
        ControlCommand,
        FlParticipant,
        FlRoundAnnouncement,
        FlClientUpdate,
        FlRoundResult,
    )
}

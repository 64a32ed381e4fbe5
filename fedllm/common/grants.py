"""Reservation grants: the accountant's Ed25519 signature over what it reserved, per hospital.

A node releases an answer only for a RoutedRequest whose inner request carries a valid grant
for that node, so whoever writes to `hospital.<id>.requests` (a compromised router, a stray
producer) cannot obtain a DP release that no accountant charged. The signed message binds the
request id, the hospital, the reserved (ε, δ), the deadline and who asked what: a grant cannot
be moved to another request, another hospital, a larger ε or a later deadline. The ρ the routed
request carries is checked against the signed (ε, δ). Only the
accountant holds the private key; nodes hold the public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedllm.common.config import Settings
from fedllm.privacy.accountant import RdpAccountant
from fedllm.schemas.records import InferenceRequest, RoutedRequest

_DEMO_LABEL = b"fedllm-reservation-grant-v1"
_ACCOUNTANT = RdpAccountant()  # the accountant's orders: what it reserves for (ε, δ)


def _demo_seed(settings: Settings) -> bytes:
    return hashlib.sha256(_DEMO_LABEL + settings.require_jwt_secret().encode()).digest()


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The accountant's key; outside demo mode it must be configured."""
    configured = settings.reservation_signing_key.get_secret_value()
    if configured:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(configured))
    if settings.mode != "demo":
        raise ValueError(
            "FEDLLM_RESERVATION_SIGNING_KEY is empty; generate one with `fedllm reservation-keys`"
        )
    return Ed25519PrivateKey.from_private_bytes(_demo_seed(settings))


def verify_key(settings: Settings) -> Ed25519PublicKey:
    """The nodes' key; outside demo mode it must be configured."""
    if settings.reservation_verify_key:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(settings.reservation_verify_key))
    if settings.mode != "demo":
        raise ValueError("FEDLLM_RESERVATION_VERIFY_KEY is empty; set the accountant's public key")
    return Ed25519PrivateKey.from_private_bytes(_demo_seed(settings)).public_key()


def new_keypair() -> tuple[str, str]:
    """(private seed, public key), base64: for FEDLLM_RESERVATION_SIGNING/VERIFY_KEY."""
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(seed).decode(), base64.b64encode(public).decode()


def grant_message(request: InferenceRequest, hospital_id: str) -> bytes:
    """The canonical bytes a grant signs (fields the router never changes)."""
    body = {
        "v": 1,
        "request_id": request["request_id"],
        "hospital_id": hospital_id,
        "epsilon": float(request["epsilon"]),
        "delta": float(request["delta"]),
        "deadline_ms": int(request["deadline_ms"]),
        "user_id": request["user_id"],
        "department": request["department"],
        "kind": request["kind"],
        "max_tokens": int(request["max_tokens"]),
        "prompt_sha256": hashlib.sha256(request["prompt"].encode()).hexdigest(),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_grants(
    key: Ed25519PrivateKey, request: InferenceRequest, hospital_ids: Iterable[str]
) -> dict[str, str]:
    """hospital id -> base64 signature, for every hospital that may serve the request."""
    return {h: base64.b64encode(key.sign(grant_message(request, h))).decode() for h in hospital_ids}


def _rho_above_grant(rho: float, request: InferenceRequest) -> bool:
    """Whether a carried ρ (unsigned) exceeds what the signed (ε, δ) reserves, as the accountant
    computes it (0, a legacy record, never does: the node derives ρ from ε then)."""
    if rho == 0:
        return False
    if not (math.isfinite(rho) and rho > 0):
        return True
    limit = _ACCOUNTANT.query_rho(epsilon=float(request["epsilon"]), delta=float(request["delta"]))
    return rho > limit * (1 + 1e-12)


def grant_refusal(key: Ed25519PublicKey, routed: RoutedRequest, hospital_id: str) -> str:
    """Why this node must not answer `routed` ("" when its grant holds)."""
    request = routed.get("request") or {}
    if routed.get("hospital_id") != hospital_id:
        return "routed to another hospital"
    signature = (request.get("grants") or {}).get(hospital_id, "")
    if not signature:
        return "no reservation grant for this hospital"
    try:
        key.verify(base64.b64decode(signature, validate=True), grant_message(request, hospital_id))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return "reservation grant does not verify"
    if float(routed.get("reserved_epsilon", 0.0)) > float(request["epsilon"]) + 1e-12:
        return "routed epsilon exceeds the reservation"
    if float(routed.get("delta", 0.0)) != float(request["delta"]):
        return "routed delta differs from the reservation"
    if _rho_above_grant(float(routed.get("reserved_rho") or 0.0), request):
        return "routed rho exceeds the reservation"
    if not 0.0 < float(routed.get("budget_share", 1.0)) <= 1.0:
        return "budget share outside (0, 1]"
    if int(routed.get("deadline_ms", 0)) > int(request["deadline_ms"]):
        return "routed deadline is later than the reservation's"
    return ""

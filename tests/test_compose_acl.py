"""The mTLS + ACL overlay for Apache Kafka (compose/kafka-acl.yml, compose/kafka-acl/acls.sh):
static checks, since neither Docker nor Apache Kafka runs here."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())["services"]
OVERLAY = yaml.safe_load((ROOT / "compose" / "kafka-acl.yml").read_text())["services"]
ACLS = (ROOT / "compose" / "kafka-acl" / "acls.sh").read_text().replace("\\\n", " ")
LINES = [line.strip() for line in ACLS.splitlines() if not line.strip().startswith("#")]


def grants_of(principal: str) -> list[str]:
    """The acls.sh lines that grant something to `principal` (shell variable or literal)."""
    return [
        line
        for line in ACLS.splitlines()
        if re.search(rf"(User:{principal}\b|^\s*(read|write)_topics {principal}\b)", line)
    ]


def test_every_fedllm_service_speaks_mtls_with_its_own_certificate() -> None:
    kafka_users = {
        n for n, s in BASE.items() if str(s.get("command", [""])[0]) == "fedllm" and n != "migrate"
    }
    assert kafka_users <= set(OVERLAY)
    for name in kafka_users:
        env = OVERLAY[name]["environment"]
        assert env["FEDLLM_KAFKA_SECURITY_PROTOCOL"] == "SSL"
        principal = "admin" if name == "topics" else name.removeprefix("node-")
        assert env["FEDLLM_KAFKA_SSL_CERTFILE"] == f"/certs/client-{principal}.pem"
        if name != "topics":
            assert (
                OVERLAY[name]["depends_on"]["acls"]["condition"] == "service_completed_successfully"
            )
    kafka = OVERLAY["kafka"]["environment"]
    assert kafka["KAFKA_SSL_CLIENT_AUTH"] == "required"
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert "PLAINTEXT" not in kafka["KAFKA_ADVERTISED_LISTENERS"]


def test_only_the_router_writes_hospital_topics_and_only_the_accountant_results() -> None:
    hospital_writes = [line for line in LINES if "--topic hospital." in line]
    assert len(hospital_writes) == 1 and "User:router" in hospital_writes[0]
    assert "prefixed" in hospital_writes[0] and "Write" in hospital_writes[0]
    results_writers = [
        line.split()[1]
        for line in LINES
        if line.startswith("write_topics") and " fedllm.results " in line + " "
    ]
    assert results_writers == ["accountant"]
    replies = [line for line in LINES if "fedllm.replies." in line]
    prefixed = [line for line in replies if "prefixed" in line]
    assert len(prefixed) == 1 and "User:accountant" in prefixed[0]
    assert all("prefixed" in line or 'fedllm.replies.$u"' in line for line in replies)


def test_nodes_read_only_their_own_hospital_topic() -> None:
    assert 'read_topics "$h" "hospital.$h.requests"' in ACLS
    assert not any(
        "read_topics" in line and "hospital." in line and "$h" not in line
        for line in ACLS.splitlines()
    )
    assert grants_of("gateway") and not any("hospital." in line for line in grants_of("gateway"))


def test_the_reservation_signing_key_reaches_the_accountant_only() -> None:
    text = (ROOT / "compose" / "docker-compose.yml").read_text()
    assert "FEDLLM_RESERVATION_SIGNING_KEY:" not in text  # never in the shared environment
    files = [f["path"] for f in BASE["accountant"]["env_file"]]
    assert "accountant.env" in files
    assert all(
        "accountant.env" not in str(s.get("env_file")) for n, s in BASE.items() if n != "accountant"
    )
    assert "FEDLLM_RESERVATION_VERIFY_KEY" in BASE["node-st_mary"]["environment"]
    example = (ROOT / "compose" / "accountant.env.example").read_text()
    assert re.search(r"^FEDLLM_RESERVATION_SIGNING_KEY=$", example, re.MULTILINE)

#!/bin/sh
# Kafka ACLs for fedllm: who may produce to and read each topic. The principal of a client is
# the CN of its TLS client certificate (ssl.principal.mapping.rules in kafka-acl.yml).
# Everything not granted here is denied (allow.everyone.if.no.acl.found=false).
# Clinicians who use Kafka directly are added with:  sh acls.sh clinician <user id>
set -eu
B="${KAFKA_ACL_BOOTSTRAP:-kafka:9094}"
C="${KAFKA_ACL_CONFIG:-/certs/admin.properties}"
acl() { /opt/kafka/bin/kafka-acls.sh --bootstrap-server "$B" --command-config "$C" --add --force "$@"; }
read_topics() { p=$1; shift; for t in "$@"; do acl --allow-principal "User:$p" --operation Read --operation Describe --topic "$t"; done; }
write_topics() { p=$1; shift; for t in "$@"; do acl --allow-principal "User:$p" --operation Write --operation Describe --topic "$t"; done; }

clinician() {  # may ask (produce requests) and read only its own reply topic
  u=$1
  write_topics "$u" fedllm.requests
  acl --allow-principal "User:$u" --operation Read --operation Describe --operation Create \
      --topic "fedllm.replies.$u"
}

if [ "${1:-}" = clinician ]; then clinician "$2"; exit 0; fi

# gateway: produces requests, admin adjustments, control commands, audit; reads results,
# budgets, heartbeats and the control log it folds.
write_topics gateway fedllm.requests fedllm.admin fedllm.control fedllm.audit
read_topics gateway fedllm.results fedllm.budgets fedllm.heartbeats fedllm.control

# accountant: the only writer of decisions, terminal results, budgets and reply topics.
read_topics accountant fedllm.requests fedllm.node-results fedllm.admin fedllm.results
write_topics accountant fedllm.decisions fedllm.results fedllm.budgets fedllm.audit \
  fedllm.requests.dlq fedllm.node-results.dlq fedllm.admin.dlq fedllm.results.dlq
acl --allow-principal User:accountant --operation Write --operation Describe \
    --resource-pattern-type prefixed --topic fedllm.replies.
acl --allow-principal User:accountant --operation All --resource-pattern-type prefixed \
    --topic fedllm-accountant --group fedllm-accountant

# router: the only writer of hospital.<id>.requests.
read_topics router fedllm.decisions fedllm.heartbeats fedllm.node-results fedllm.control
acl --allow-principal User:router --operation Read --group router
acl --allow-principal User:router --operation Write --operation Describe \
    --resource-pattern-type prefixed --topic hospital.
write_topics router fedllm.node-results fedllm.audit fedllm.decisions.dlq

# each node: reads only its own hospital's requests.
for h in ${FEDLLM_ACL_HOSPITALS:-st_mary city_general northside}; do
  read_topics "$h" "hospital.$h.requests" fedllm.control
  acl --allow-principal "User:$h" --operation Read --group "node-$h"
  write_topics "$h" fedllm.node-results fedllm.heartbeats fedllm.audit "hospital.$h.requests.dlq"
done

# auditor: reads the audit topic.
read_topics auditor fedllm.audit
acl --allow-principal User:auditor --operation Read --group auditor
write_topics auditor fedllm.audit.dlq

for u in ${FEDLLM_ACL_CLINICIANS:-}; do clinician "$u"; done
/opt/kafka/bin/kafka-acls.sh --bootstrap-server "$B" --command-config "$C" --list

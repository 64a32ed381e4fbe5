"""Produce a question straight to the request topic and read its answer from your reply topic.

    python -m fedllm up --kafka-port 19092           # in another terminal
    KAFKA_BOOTSTRAP=127.0.0.1:19092 python examples/ask_kafka.py "Which drugs treat angina?"

The event is an Avro InferenceRequest (schemas/inference_request.avsc) with your bearer token
in its `authorization` header; the accountant verifies it before it reserves any budget and
copies your terminal result to `fedllm.replies.<your user id>`, keyed by request id.
(`fedllm.client.KafkaClient` does all of this in one call.)
"""

import asyncio
import os
import sys
import uuid

from aiokafka import TopicPartition

from fedllm.client import local_token
from fedllm.common import codec, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import ensure_topics, make_consumer, make_producer, now_ms

USER, DEPT = "alice", "cardiology"
token = os.environ.get("FEDLLM_TOKEN") or local_token(USER, department=DEPT)
prompt = sys.argv[1] if len(sys.argv) > 1 else "Which drugs treat angina?"


async def main() -> dict:
    settings, reply = Settings(), topics.reply_topic(USER)  # KAFKA_BOOTSTRAP, TLS from env
    await ensure_topics(settings, {reply: 1})  # or provisioned by an operator, with an ACL
    consumer, producer = make_consumer(settings, group_id=None), make_producer(settings)
    await consumer.start()
    await producer.start()
    try:
        # the broker's names carry the deployment's namespace (FEDLLM_TOPIC_NAMESPACE, usually "")
        reply_tp = TopicPartition(topics.scoped(settings, reply), 0)
        consumer.assign([reply_tp])
        await consumer.seek_to_end(reply_tp)
        await consumer.position(reply_tp)  # listen before asking
        rid, now = str(uuid.uuid4()), now_ms()
        request = {
            "request_id": rid,
            "user_id": USER,
            "role": "doctor",
            "department": DEPT,
            "prompt": prompt,
            "max_tokens": 6,
            "temperature": 1.0,
            "epsilon": 1.0,
            "delta": 0.0,
            "created_at_ms": now,
            "deadline_ms": now + 300_000,
        }
        value, headers = codec.encode("InferenceRequest", request)
        credential = [("authorization", f"Bearer {token}".encode())]
        await producer.send_and_wait(
            topics.scoped(settings, topics.REQUESTS),
            value,
            key=USER.encode(),
            headers=headers + credential,
        )
        async for msg in consumer:  # only your own results are on this topic
            result = codec.decode_expect("InferenceResult", msg.value, msg.headers)
            if result["request_id"] == rid:
                return result
    finally:
        await consumer.stop()
        await producer.stop()


result = asyncio.run(main())
print(f"{result['status']}: {result['response'] or result['reason']}")
print(f"ε spent: {result['privacy_cost']:.4f}   budget left: {result['remaining_budget']:.4f}")
sys.exit(0 if result["status"] == "ok" else 1)

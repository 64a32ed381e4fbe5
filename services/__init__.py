"""The fedllm services; each talks to the others only through Kafka topics and Avro schemas."""

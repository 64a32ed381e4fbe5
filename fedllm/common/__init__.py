"""Shared by every service: config, topic names, Avro codec, Kafka clients, database engines."""

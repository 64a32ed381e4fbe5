"""The node_worker service."""

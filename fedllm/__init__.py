"""fedllm: a federated, differentially private LLM router for hospitals."""

__version__ = "0.1.0"

"""A differentially private aggregate query: how many patients take metformin, per hospital
set, with discrete Gaussian noise (no text generation, no model).

    python -m fedllm up                              # in another terminal
    python examples/aggregate_query.py

The query language is in services/node_worker/aggregate.py (count / sum / mean / histogram).
"""

import json
import os
import sys

from fedllm.client import HttpClient, local_token

url = os.environ.get("FEDLLM_URL", "http://127.0.0.1:8080")
token = os.environ.get("FEDLLM_TOKEN") or local_token(
    "alice", role="doctor", department="cardiology"
)
query = {"op": "count", "where": {"medication": "metformin"}}

with HttpClient(url, token=token) as client:
    answer = client.ask(json.dumps(query), kind="aggregate", epsilon=0.5, timeout_s=120)

if not answer.ok:
    sys.exit(f"{answer.status}: {answer.reason}")
print(f"query:       {json.dumps(query)}")
print(f"release:     {answer.text}")  # the noisy statistic, released by {answer.node_id}
print(f"ε spent:     {answer.epsilon_spent:.4f}")
print(f"budget left: {answer.budget_left}")

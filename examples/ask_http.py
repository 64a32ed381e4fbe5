"""Ask one question over the HTTP gateway and print the answer, ε spent and budget left.

    python -m fedllm up                              # in another terminal
    python examples/ask_http.py "What is the usual treatment for chest pain?"

FEDLLM_URL (default http://127.0.0.1:8080) names the gateway; FEDLLM_TOKEN is your bearer
token (from POST /v1/auth/token); without one, a demo token is minted for "alice" (demo mode).
"""

import os
import sys

from fedllm.client import HttpClient, local_token

url = os.environ.get("FEDLLM_URL", "http://127.0.0.1:8080")
token = os.environ.get("FEDLLM_TOKEN") or local_token(
    "alice", role="doctor", department="cardiology"
)
prompt = sys.argv[1] if len(sys.argv) > 1 else "What is the usual treatment for chest pain?"

with HttpClient(url, token=token) as client:
    answer = client.ask(prompt, epsilon=1.0, max_tokens=6, timeout_s=300)

print(f"status:      {answer.status} {answer.reason}")
print(f"answer:      {answer.text.strip()}")
print(f"ε spent:     {answer.epsilon_spent:.4f}")
print(f"budget left: {answer.budget_left}")
print(f"answered by: {answer.node_id}")
sys.exit(0 if answer.ok else 1)

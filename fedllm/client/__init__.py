"""Ask fedllm a question from Python, over HTTP or over Kafka, with the same `ask(...)`.

from fedllm.client import HttpClient, KafkaClient
answer = HttpClient("http://127.0.0.1:8080", token=token).ask("…", epsilon=1.0)
answer = KafkaClient(bootstrap="127.0.0.1:9092", token=token).ask("…", epsilon=1.0)
print(answer.text, answer.epsilon_spent, answer.budget_left)
"""

from fedllm.client.http import HttpClient
from fedllm.client.kafka import KafkaClient
from fedllm.client.models import Answer, AskError, AskTimeout, Client
from fedllm.client.tokens import local_token

__all__ = ["Answer", "AskError", "AskTimeout", "Client", "HttpClient", "KafkaClient", "local_token"]

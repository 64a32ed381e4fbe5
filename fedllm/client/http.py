"""`ask` over the HTTP gateway (POST /v1/inference with a bearer token)."""

from __future__ import annotations

from typing import Any

import httpx

from fedllm.client.models import Answer, AskError, AskTimeout, Kind


class HttpClient:
    """A clinician's session with the gateway at `base_url`."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._http = httpx.Client(
            base_url=self.base_url,
            verify=verify,
            cert=cert,
            headers={"Authorization": f"Bearer {token}"},
        )

    @classmethod
    def login(
        cls, base_url: str, *, username: str, password: str, verify: bool | str = True
    ) -> HttpClient:
        """Obtain a token with a username and password (POST /v1/auth/token)."""
        with httpx.Client(base_url=base_url, verify=verify, timeout=30) as http:
            r = http.post("/v1/auth/token", json={"username": username, "password": password})
        if r.status_code != 200:
            raise AskError(r.status_code, _detail(r))
        return cls(base_url, token=r.json()["access_token"], verify=verify)

    def ask(
        self,
        prompt: str,
        *,
        epsilon: float,
        max_tokens: int = 32,
        kind: Kind = "generate",
        department: str | None = None,
        hospitals: tuple[str, ...] = (),
        temperature: float = 1.0,
        timeout_s: float = 180.0,
        idempotency_key: str | None = None,
    ) -> Answer:
        """Ask one question; blocks until its terminal answer or `timeout_s`.

        `idempotency_key` goes in the `Idempotency-Key` header: asking again under the same key
        (after a timeout or a lost connection) is the same request, charged once, and returns
        its answer."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
        body: dict[str, Any] = {
            "prompt": prompt,
            "privacy_budget": epsilon,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "kind": kind,
            "hospitals": list(hospitals),
        }
        if department is not None:
            body["department"] = department
        try:
            r = self._http.post("/v1/inference", json=body, timeout=timeout_s, headers=headers)
        except httpx.TimeoutException:
            raise AskTimeout("(unknown: the gateway had not answered)", timeout_s) from None
        except httpx.TransportError as exc:
            raise AskError(0, f"gateway unreachable: {exc}") from None
        data = _json(r)
        if r.status_code == 200:
            return Answer(
                request_id=data["request_id"],
                status="ok",
                text=data["response"],
                epsilon_spent=data["privacy_cost"],
                budget_left=data["remaining_budget"],
                node_id=data["node_id"],
                is_private=data["is_private"],
                tokens=data["tokens"],
            )
        reason = str(data.get("detail", r.text))
        rid = str(data.get("request_id", ""))
        if r.status_code in (401, 403):
            return Answer(
                request_id=rid,
                status="rejected",
                reason=reason,
                budget_left=data.get("remaining_budget"),
            )
        if r.status_code == 502:
            return Answer(request_id=rid, status="failed", reason=reason)
        if r.status_code == 504:
            return Answer(request_id=rid, status="timeout", reason=reason)
        raise AskError(r.status_code, reason)

    def budget(self, user_id: str) -> dict[str, Any]:
        """The caller's budget (GET /v1/privacy/budget/{user_id})."""
        r = self._http.get(f"/v1/privacy/budget/{user_id}", timeout=30)
        if r.status_code != 200:
            raise AskError(r.status_code, _detail(r))
        return dict(r.json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json(r: httpx.Response) -> dict[str, Any]:
    try:
        data = r.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _detail(r: httpx.Response) -> str:
    detail = _json(r).get("detail", r.text)
    return detail if isinstance(detail, str) else str(detail)

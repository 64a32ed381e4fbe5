"""`ask` over the HTTP gateway (POST /v1/inference with a bearer token)."""

from __future__ import annotations

from typing import Any

import httpx

from fedllm.client.models import Answer, AskError, AskTimeout, Kind, Status

#: The gateway's status codes that carry a terminal answer (any other is an AskError).
_STATUS: dict[int, Status] = {
    200: "ok",
    401: "rejected",
    403: "rejected",
    502: "failed",
    504: "timeout",
}


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
        status = _STATUS.get(r.status_code)
        if status == "ok":
            return Answer.from_result(data, status=status)
        reason = str(data.get("detail", r.text))
        if status is None:
            raise AskError(r.status_code, reason)
        return Answer.from_result(data, status=status, reason=reason)

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

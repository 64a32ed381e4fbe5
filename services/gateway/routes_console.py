"""The web console at /ui: server-rendered pages and one small vanilla JS file, all served by
the gateway (hospital networks are often offline: nothing is loaded from elsewhere, and the
Content-Security-Policy says so).

- /ui/clinician: sign in, ask a question, see the answer, the ε it spent and the budget left;
- /ui/privacy: department and hospital ledgers over time, as SVG plots rendered here;
- /ui/admin: nodes (heartbeats and admission), emergency controls, circuit breakers.

The pages hold no data; the script calls the same /v1 API as any client, with the bearer token
from the sign-in form (kept in sessionStorage), so RBAC, lockdown and audit apply unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from html import escape
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fedllm.services.gateway.console_plots import LedgerHistory, line_chart, sample_forever
from fedllm.services.gateway.deps import CurrentPrincipal, GatewayState, State, deny

EXTRA_KEY = "ledger_history"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
PAGES = {"clinician": "Clinician", "privacy": "Privacy officer", "admin": "Administrator"}


def history(state: GatewayState) -> LedgerHistory:
    found = state.extra.get(EXTRA_KEY)
    if found is None:
        found = LedgerHistory()
        state.extra[EXTRA_KEY] = found
    return found


def take_sample(state: GatewayState) -> None:
    history(state).sample(
        state.settings,
        state.budgets.department_to_status,
        state.nodes.nodes,
        now_s=time.time(),
    )


async def start(state: GatewayState) -> None:
    hist = history(state)
    state.extra["ledger_task"] = asyncio.create_task(
        sample_forever(hist, lambda: take_sample(state))
    )


async def stop(state: GatewayState) -> None:
    task = state.extra.pop("ledger_task", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def _asset(name: str) -> str:
    return (resources.files("fedllm.services.gateway") / name).read_text()


LOGIN = """
<section aria-labelledby="login-h">
  <h2 id="login-h">Sign in</h2>
  <form id="login-form">
    <label for="username">User name</label>
    <input id="username" name="username" autocomplete="username" required>
    <label for="password">Password</label>
    <input id="password" name="password" type="password" autocomplete="current-password" required>
    <button id="login-submit" type="submit">Sign in</button>
    <button id="logout" type="button">Sign out</button>
  </form>
  <p id="who" aria-live="polite"></p>
</section>
"""

CLINICIAN = """
<section aria-labelledby="ask-h">
  <h2 id="ask-h">Ask a question</h2>
  <form id="ask-form">
    <label for="prompt">Question</label>
    <textarea id="prompt" name="prompt" rows="4" required maxlength="4000"></textarea>
    <label for="epsilon">Privacy cost ε for this question</label>
    <input id="epsilon" name="epsilon" type="number" min="0.01" max="10" step="0.01" value="0.5"
      required>
    <button id="ask-submit" type="submit">Ask</button>
  </form>
</section>
<section aria-labelledby="answer-h">
  <h2 id="answer-h">Answer</h2>
  <dl>
    <dt>Answer</dt><dd id="answer">—</dd>
    <dt>ε spent</dt><dd id="eps-spent">—</dd>
    <dt>Budget left (ε)</dt><dd id="budget-left">—</dd>
    <dt>Answered by</dt><dd id="answered-by">—</dd>
  </dl>
</section>
"""

PRIVACY = """
<section aria-labelledby="ledgers-h">
  <h2 id="ledgers-h">Ledgers over time</h2>
  <p>Department ε spent in the current budget window, and each hospital's budget-room level
  (0 exhausted … 4 most room), sampled by this gateway.</p>
  <button id="refresh-plots" type="button">Refresh plots</button>
  <div id="plots" aria-live="polite"></div>
</section>
"""

ADMIN = """
<section aria-labelledby="emergency-h">
  <h2 id="emergency-h">Emergency controls</h2>
  <p id="emergency-state" aria-live="polite">—</p>
  <form id="lockdown-form">
    <label for="lockdown-reason">Reason for the lockdown change</label>
    <input id="lockdown-reason" name="reason" minlength="3" required>
    <button id="lockdown-on" type="submit" value="on">Lock down (admins only)</button>
    <button id="lockdown-off" type="submit" value="off">Lift lockdown</button>
  </form>
  <form id="halt-form">
    <label for="halt-reason">Reason for the halt change</label>
    <input id="halt-reason" name="reason" minlength="3" required>
    <button id="halt-on" type="submit" value="on">Halt all processing</button>
    <button id="halt-off" type="submit" value="off">Resume processing</button>
  </form>
</section>
<section aria-labelledby="nodes-h">
  <h2 id="nodes-h">Nodes</h2>
  <button id="refresh-nodes" type="button">Refresh nodes</button>
  <table id="nodes-table">
    <caption>Hospital nodes: admission, liveness and load</caption>
    <thead><tr><th scope="col">Hospital</th><th scope="col">Admission</th>
      <th scope="col">Alive</th><th scope="col">Queue</th><th scope="col">Error rate</th>
      <th scope="col">Latency (ms)</th><th scope="col">Breaker</th></tr></thead>
    <tbody></tbody>
  </table>
  <form id="breaker-form">
    <label for="breaker-node">Node</label>
    <input id="breaker-node" name="node" required pattern="[A-Za-z0-9_.\\-]{1,64}">
    <label for="breaker-reason">Reason</label>
    <input id="breaker-reason" name="reason" minlength="3" required>
    <button id="breaker-open" type="submit" value="open">Open breaker</button>
    <button id="breaker-close" type="submit" value="close">Close breaker</button>
  </form>
  <form id="node-form">
    <label for="node-id">Hospital id</label>
    <input id="node-id" name="hospital_id" required pattern="[A-Za-z0-9_.\\-]{1,64}">
    <label for="node-action">Action</label>
    <select id="node-action" name="action">
      <option value="register">Register</option><option value="approve">Approve</option>
      <option value="drain">Drain</option><option value="remove">Remove</option>
    </select>
    <label for="node-departments">Departments (comma-separated, register only)</label>
    <input id="node-departments" name="departments">
    <label for="node-reason">Reason</label>
    <input id="node-reason" name="reason" minlength="3" required>
    <button id="node-submit" type="submit">Apply</button>
  </form>
</section>
"""

BODIES = {"clinician": CLINICIAN, "privacy": PRIVACY, "admin": ADMIN}


def page(name: str) -> str:
    current = ' aria-current="page"'
    nav = " ".join(
        f'<a href="/ui/{key}"{current if key == name else ""}>{escape(title)}</a>'
        for key, title in PAGES.items()
    )
    title = PAGES.get(name, "Console")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedllm console: {escape(title)}</title>
<link rel="stylesheet" href="/ui/static/console.css">
<script src="/ui/static/console.js" defer></script>
</head>
<body data-page="{escape(name)}">
<a class="skip" href="#main">Skip to content</a>
<header><h1>fedllm console</h1><nav aria-label="Console pages">{nav}</nav></header>
<main id="main" tabindex="-1">
<h1 class="page-title">{escape(title)}</h1>
<p id="status" role="status" aria-live="polite"></p>
{LOGIN}
{BODIES.get(name, "")}
</main>
</body></html>"""


def _html(text: str) -> HTMLResponse:
    return HTMLResponse(text, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})


def build_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/ui")
    async def index() -> RedirectResponse:
        return RedirectResponse("/ui/clinician", status_code=307)

    @router.get("/ui/static/{name}")
    async def static(name: str) -> Response:
        types = {"console.js": "text/javascript", "console.css": "text/css"}
        if name not in types:
            return Response(status_code=404)
        return Response(_asset(name), media_type=types[name], headers={"Cache-Control": "no-cache"})

    @router.get("/ui/{name}")
    async def console_page(name: str) -> Response:
        if name not in PAGES:
            return Response(status_code=404)
        return _html(page(name))

    @router.get("/v1/console/ledgers", response_class=HTMLResponse)
    async def ledgers(request: Request, state: State, principal: CurrentPrincipal) -> HTMLResponse:
        """Ledger plots (inline SVG) for privacy officers: any department with
        `budget.read.any`, one's own with `budget.read.department`."""
        if principal.can("budget.read.any"):
            only = None
        elif principal.can("budget.read.department"):
            only = principal.department
        else:
            raise await deny(state, request, principal, "may not read department ledgers")
        take_sample(state)
        hist = history(state)
        departments = hist.series(1)
        if only is not None:
            departments = {d: s for d, s in departments.items() if d == only}
        limit = max(state.settings.budget.department_epsilon.values(), default=1.0)
        parts = [
            '<figure aria-labelledby="dept-cap">',
            line_chart(
                departments,
                title="Department ε spent (current window)",
                y_label="ε spent",
                y_max=limit,
                chart_id="dept-plot",
            ),
            '<figcaption id="dept-cap">Department ledgers</figcaption></figure>',
            '<figure aria-labelledby="hosp-cap">',
            line_chart(
                hist.series(2),
                title="Hospital budget room (0 exhausted … 4 most room)",
                y_label="level",
                y_max=4.0,
                chart_id="hosp-plot",
            ),
            '<figcaption id="hosp-cap">Hospital ledgers</figcaption></figure>',
        ]
        return _html("".join(parts))

    return router

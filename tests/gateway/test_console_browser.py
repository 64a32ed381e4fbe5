"""The web console in headless Chromium (Debian package `chromium`), driven over the DevTools
protocol (aiohttp websocket): a real gateway (uvicorn, real broker) and an accountant stand-in.
Each page is clicked through, screenshotted under the pytest tmp dir, and checked for labels,
keyboard access and for loading nothing from outside the gateway."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import uvicorn
from argon2 import PasswordHasher

from fedllm.services.gateway.app import create_app
from fedllm.services.gateway.settings import GatewaySettings, UserRecord
from tests.gateway.peers import FakeAccountant, budget_status, ok_result

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "chromium is not installed (Debian package `chromium`; .ci/run installs it)",
        allow_module_level=True,
    )

PASSWORD = "console-test-password-1"
SUFFIX = uuid.uuid4().hex[:6]
DOCTOR, ADMIN = f"dr_ui_{SUFFIX}", f"adm_ui_{SUFFIX}"
ANSWER = "Triage chest pain with an ECG within ten minutes."

LABEL_CHECK = """(() => {
  const bad = [];
  for (const el of document.querySelectorAll('input, select, textarea')) {
    if (!(el.labels && el.labels.length) && !el.getAttribute('aria-label')) bad.push(el.id || el.name);
  }
  for (const b of document.querySelectorAll('button')) {
    if (!b.textContent.trim() && !b.getAttribute('aria-label')) bad.push(b.id || 'button');
  }
  return bad;
})()"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run the app under uvicorn in a thread (its own event loop); yields the base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "gateway did not start"
        assert time.monotonic() < deadline, "gateway not started in 60 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class Browser:
    """One Chromium page over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), timeout=30)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait(self, expression: str, timeout_s: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.eval(expression)
            if value:
                return value
            status = await self.eval("(document.getElementById('status')||{}).textContent")
            assert time.monotonic() < deadline, f"timed out on {expression!r}; status: {status!r}"
            await asyncio.sleep(0.1)

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait("document.readyState === 'complete' && !!document.body.dataset.page")

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        assert path.stat().st_size > 1000

    async def tab_order(self, limit: int = 60) -> list[str]:
        """Element ids reached by pressing Tab from the top of the page."""
        await self.eval("document.activeElement && document.activeElement.blur(), true")
        reached: list[str] = []
        for _ in range(limit):
            for kind in ("keyDown", "keyUp"):
                await self.send(
                    "Input.dispatchKeyEvent",
                    type=kind,
                    key="Tab",
                    code="Tab",
                    windowsVirtualKeyCode=9,
                    nativeVirtualKeyCode=9,
                )
            reached.append(
                await self.eval("document.activeElement.id || document.activeElement.tagName")
            )
        return reached

    async def sign_in(self, user: str) -> None:
        await self.eval(
            f"document.getElementById('username').value = {json.dumps(user)};"
            f"document.getElementById('password').value = {json.dumps(PASSWORD)};"
            "document.getElementById('login-submit').click(); true"
        )
        await self.wait("document.getElementById('who').textContent.startsWith('Signed in as')")

    async def external_loads(self, base: str) -> list[str]:
        names = await self.eval("performance.getEntriesByType('resource').map(e => e.name)")
        return [n for n in names if not n.startswith(base)]

    async def check_accessibility(self, submit_id: str) -> None:
        assert await self.eval(LABEL_CHECK) == []
        order = await self.tab_order()
        assert "username" in order and "login-submit" in order, order
        assert submit_id in order, f"{submit_id} not reachable by keyboard: {order}"
        assert order.index("username") < order.index("login-submit") < order.index(submit_id)


@pytest_asyncio.fixture(loop_scope="session")
async def console(settings, tmp_path: Path) -> AsyncIterator[tuple[Browser, str]]:
    hashed = PasswordHasher().hash(PASSWORD)
    gw = GatewaySettings(
        users=[
            UserRecord(
                username=DOCTOR, password_hash=hashed, department="cardiology", role="doctor"
            ),
            UserRecord(username=ADMIN, password_hash=hashed, department="general", role="admin"),
        ]
    )
    app = create_app(settings, gateway_settings=gw)

    def behaviour(req: dict[str, Any]) -> dict[str, Any] | None:
        if req["user_id"] != DOCTOR:
            return None
        return ok_result(req, response=ANSWER, remaining_budget=9.5)

    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1200,1400",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with serve(app) as base:
            async with (
                FakeAccountant(settings, behaviour) as accountant,
                aiohttp.ClientSession() as session,
            ):
                await accountant.publish_budget(
                    budget_status(DOCTOR, "cardiology", spent=0.5, dept_remaining=11.0)
                )
                async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                    targets = await r.json()
                page = next(t for t in targets if t["type"] == "page")
                async with session.ws_connect(
                    page["webSocketDebuggerUrl"], max_msg_size=64 * 2**20
                ) as ws:
                    browser = Browser(ws)
                    await browser.send("Page.enable")
                    await browser.send("Runtime.enable")
                    yield browser, base
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()


async def test_clinician_asks_and_sees_answer_epsilon_and_budget(console, tmp_path) -> None:
    browser, base = console
    await browser.open(f"{base}/ui/clinician")
    await browser.check_accessibility("ask-submit")
    await browser.sign_in(DOCTOR)
    await browser.eval(
        "document.getElementById('prompt').value = 'How is chest pain triaged?';"
        "document.getElementById('epsilon').value = '0.5';"
        "document.getElementById('ask-submit').click(); true"
    )
    await browser.wait("document.getElementById('answer').textContent !== '—'")
    assert await browser.eval("document.getElementById('answer').textContent") == ANSWER
    assert await browser.eval("document.getElementById('eps-spent').textContent") == "0.50"
    assert await browser.eval("document.getElementById('budget-left').textContent") == "9.50"
    await browser.screenshot(tmp_path / "clinician.png")
    assert await browser.external_loads(base) == []


async def test_privacy_officer_sees_ledger_plots(console, tmp_path) -> None:
    browser, base = console
    await browser.open(f"{base}/ui/privacy")
    await browser.check_accessibility("refresh-plots")
    await browser.sign_in(ADMIN)
    await browser.wait("!!document.querySelector('#plots svg#dept-plot')")
    assert await browser.eval("document.querySelectorAll('#plots svg[role=img] title').length") == 2
    await browser.wait(  # the accountant's snapshot: 15 - 11 = 4 ε spent in cardiology
        "document.getElementById('refresh-plots').click(),"
        "(document.querySelector('#dept-plot desc')||{textContent:''}).textContent"
        ".includes('cardiology: latest 4.00')"
    )
    await browser.screenshot(tmp_path / "privacy.png")
    assert await browser.external_loads(base) == []


async def test_admin_sees_nodes_and_uses_emergency_controls(console, tmp_path) -> None:
    browser, base = console
    await browser.open(f"{base}/ui/admin")
    await browser.check_accessibility("node-submit")
    await browser.sign_in(ADMIN)
    await browser.wait(
        "document.querySelector('#nodes-table tbody').textContent.includes('st_mary')"
    )
    node = f"ui_{SUFFIX}"
    await browser.eval(
        f"document.getElementById('node-id').value = {json.dumps(node)};"
        "document.getElementById('node-action').value = 'register';"
        "document.getElementById('node-departments').value = 'cardiology';"
        "document.getElementById('node-reason').value = 'console test';"
        "document.getElementById('node-submit').click(); true"
    )
    await browser.wait(
        f"document.getElementById('status').textContent === '{node} is now registered.'"
    )
    await browser.wait(
        f"document.querySelector('#nodes-table tbody').textContent.includes('{node}')"
    )
    await browser.eval(
        "document.getElementById('lockdown-reason').value = 'console drill';"
        "document.getElementById('lockdown-on').click(); true"
    )
    try:
        await browser.wait(
            "document.getElementById('emergency-state').textContent.includes('LOCKDOWN: console drill')"
        )
        await browser.screenshot(tmp_path / "admin.png")
    finally:
        await browser.eval(
            "document.getElementById('lockdown-reason').value = 'drill over';"
            "document.getElementById('lockdown-off').click(); true"
        )
    await browser.wait(
        "document.getElementById('emergency-state').textContent.startsWith('no lockdown')"
    )
    assert await browser.external_loads(base) == []

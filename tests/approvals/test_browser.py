"""A real browser clicks Approve: headless Debian chromium driven by chromedriver (WebDriver HTTP).

No selenium: the W3C WebDriver protocol is a handful of JSON calls made with aiohttp. Skips with
the reason when chromium or chromedriver is not installed.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from pgproxy.approvals.store import ApprovalStatus

from .conftest import HarnessFactory, free_port, hold_request, link_of

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
)


class WebDriver:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base
        self.session = ""

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.base}{path}"
        async with self.http.request(method, url, json=body) as resp:
            data = await resp.json()
        if resp.status != 200:
            raise AssertionError(f"webdriver {method} {path}: {resp.status} {data}")
        return data["value"]

    async def start(self, profile_dir: str) -> None:
        args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile_dir}",
        ]
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
        value = await self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.session = value["sessionId"]

    async def go(self, url: str) -> None:
        await self.call("POST", f"/session/{self.session}/url", {"url": url})

    async def find(self, css: str) -> str:
        value = await self.call(
            "POST", f"/session/{self.session}/element", {"using": "css selector", "value": css}
        )
        return str(value[ELEMENT])

    async def text(self, css: str) -> str:
        return str(
            await self.call("GET", f"/session/{self.session}/element/{await self.find(css)}/text")
        )

    async def type(self, css: str, text: str) -> None:
        eid = await self.find(css)
        await self.call("POST", f"/session/{self.session}/element/{eid}/value", {"text": text})

    async def click(self, css: str) -> None:
        await self.call("POST", f"/session/{self.session}/element/{await self.find(css)}/click", {})

    async def title(self) -> str:
        return str(await self.call("GET", f"/session/{self.session}/title"))

    async def quit(self) -> None:
        if self.session:
            await self.call("DELETE", f"/session/{self.session}")
            self.session = ""


@pytest.fixture
async def webdriver() -> AsyncIterator[WebDriver]:
    assert CHROMEDRIVER is not None
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        CHROMEDRIVER,
        f"--port={port}",
        "--allowed-ips=127.0.0.1",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    profile = tempfile.TemporaryDirectory(prefix="pgproxy-chromium-")
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
    driver = WebDriver(http, f"http://127.0.0.1:{port}")
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    async with http.get(f"{driver.base}/status") as resp:
                        if resp.status == 200 and (await resp.json())["value"]["ready"]:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        await driver.start(profile.name)
        yield driver
    finally:
        try:
            await driver.quit()
        finally:
            await http.close()
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
            profile.cleanup()


@pytest.mark.timeout(120)
async def test_a_browser_opens_the_link_and_clicks_approve(
    harness: HarnessFactory, webdriver: WebDriver
) -> None:
    h = await harness()
    pending = await h.service.submit(hold_request())
    url, approval_id, _ = link_of(await h.mailbox.next())
    waiter = asyncio.create_task(h.service.wait(approval_id))
    await webdriver.go(url)
    assert approval_id in await webdriver.title()
    assert await webdriver.text("#status") == "Status: pending"
    assert "DROP TABLE public.patients_archive" in await webdriver.text("#sql")
    await asyncio.sleep(0.2)
    assert not waiter.done()  # loading the page decided nothing
    await webdriver.type("#reason", "reviewed in the browser")
    await webdriver.click("#approve")
    async with asyncio.timeout(20):
        while True:
            try:
                if "approved" in await webdriver.text("#result"):
                    break
            except AssertionError:
                pass  # the result page is not there yet
            await asyncio.sleep(0.1)
    outcome = await asyncio.wait_for(waiter, 10)
    assert outcome.status == "approved"
    assert outcome.approval_id == pending.approval_id
    assert outcome.reason == "reviewed in the browser"
    # opening the link again shows the outcome, without a form
    await webdriver.go(url)
    assert "already approved" in await webdriver.text("#closed")
    rec = await h.service.get(approval_id)
    assert rec is not None and rec.status is ApprovalStatus.APPROVED

"""Headless Chromium with the network cut: what a page shows on an air-gapped line.

Every request leaves through a proxy on a closed port (loopback included) and every host
name fails to resolve, so a script or style sheet from a CDN never arrives; pages on the
disk (file://) still load with the files beside them, and ``offline_tab`` reaches the one
service under test. `.ci/run` installs Debian's `chromium`; without it these tests skip,
saying so.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium on PATH (apt-get install chromium; .ci/run installs it)"
)

# Virtual time: Chromium fast-forwards timers, so scripts finish drawing before the dump
# without the test waiting in real time.
_SCRIPT_BUDGET_MS = 10_000
_TIMEOUT_S = 60


def _offline_chromium(profile: Path, reachable: str | None = None) -> list[str]:
    """Chromium with no network but ``reachable`` (IP:port); ``profile`` is an empty folder
    for its user data, so runs never share state."""
    assert CHROMIUM is not None
    # The resolver rules catch IP literals too: the reachable address must be excluded from both.
    bypass, resolver = ("<-loopback>", "MAP * ~NOTFOUND") if reachable is None else (
        f"<-loopback>;{reachable}", f"MAP * ~NOTFOUND, EXCLUDE {reachable.rpartition(':')[0]}"
    )
    return [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={profile}",
        "--proxy-server=127.0.0.1:9", f"--proxy-bypass-list={bypass}", f"--host-resolver-rules={resolver}",
    ]


def offline_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after its scripts ran, loaded with no network."""
    command = [
        *_offline_chromium(profile), f"--virtual-time-budget={_SCRIPT_BUDGET_MS}",
        "--dump-dom", page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    assert result.returncode == 0 and "<html" in result.stdout, f"chromium failed:\n{result.stderr[-2000:]}"
    return result.stdout


class Tab:
    """One Chromium tab driven over the DevTools protocol: open a URL, click a link, read the page."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection, self.calls = connection, 0
        self.failed_requests: list[str] = []  # URLs the network refused (a CDN, a font service)
        self._requests: dict[str, str] = {}
        self._loaded = False
        self.call("Page.enable")
        self.call("Network.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.calls += 1
        self.connection.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = self._receive(_TIMEOUT_S)
            if message.get("id") == self.calls:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def _receive(self, timeout: float) -> dict[str, Any]:
        message = json.loads(self.connection.recv(timeout=timeout))
        event, params = message.get("method"), message.get("params", {})
        if event == "Page.loadEventFired":
            self._loaded = True
        elif event == "Network.requestWillBeSent":
            self._requests[params["requestId"]] = params["request"]["url"]
        elif event == "Network.loadingFailed" and not params.get("canceled"):
            self.failed_requests.append(self._requests.get(params["requestId"], "?"))
        return message

    def _until_loaded(self) -> None:
        deadline = time.monotonic() + _TIMEOUT_S
        while not self._loaded:
            self._receive(deadline - time.monotonic())

    def open(self, url: str) -> None:
        self._loaded = False
        self.call("Page.navigate", url=url)
        self._until_loaded()

    def click(self, selector: str) -> None:
        """Click the element ``selector`` finds, as a person would, and wait for the next page."""
        self._loaded = False
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        self._until_loaded()

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in answer, f"{expression}: {answer['exceptionDetails']}"
        return answer["result"].get("value")

    @property
    def url(self) -> str:
        return self.evaluate("location.href")

    @property
    def dom(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")


@contextlib.contextmanager
def offline_tab(profile: Path, reachable: str) -> Iterator[Tab]:
    """A tab of headless Chromium that reaches ``reachable`` (IP:port on loopback) and nothing else."""
    process = subprocess.Popen(
        [*_offline_chromium(profile, reachable), "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port = _devtools_port(profile, process)
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=_TIMEOUT_S).json()
        page = next(target for target in targets if target["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as connection:
            yield Tab(connection)
    finally:
        process.terminate()
        process.wait(timeout=_TIMEOUT_S)


def _devtools_port(profile: Path, process: subprocess.Popen) -> int:
    """The port Chromium chose (--remote-debugging-port=0), from the file it writes in its profile."""
    announced = profile / "DevToolsActivePort"
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"chromium exited with {process.returncode}"
        if announced.is_file() and (lines := announced.read_text().splitlines()):
            return int(lines[0])
        time.sleep(0.1)
    raise AssertionError(f"chromium did not open its DevTools port within {_TIMEOUT_S} s")


def external_references(html: str) -> list[str]:
    """Every src or href of ``html`` that points at another host (a CDN, a font service)."""
    return re.findall(r"""(?:src|href)\s*=\s*["']?((?:https?:)?//[^"'\s>]+)""", html, flags=re.IGNORECASE)


class _Tables(HTMLParser):
    """The text of each cell of each <table>, row by row, keyed by the table's id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._rows: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._rows = self.tables.setdefault(dict(attrs).get("id") or f"table{len(self.tables)}", [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._rows:
            self._rows[-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._rows = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables(dom: str) -> dict[str, list[list[str]]]:
    """Every table of ``dom``: id (or table0, table1, ...) -> rows of cell texts."""
    parser = _Tables()
    parser.feed(dom)
    return parser.tables

"""Headless Chromium with the network cut: what a page shows on an air-gapped line.

Every request leaves through a proxy on a closed port (loopback included) and every host
name fails to resolve, so a script or style sheet from a CDN never arrives; pages on the
disk (file://) still load with the files beside them. `.ci/run` installs Debian's
`chromium`; without it these tests skip, saying so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium on PATH (apt-get install chromium; .ci/run installs it)"
)

# Virtual time: Chromium fast-forwards timers, so scripts finish drawing before the dump
# without the test waiting in real time.
_SCRIPT_BUDGET_MS = 10_000
_TIMEOUT_S = 60


def offline_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after its scripts ran, loaded with no network.

    ``profile`` is an empty folder for Chromium's user data, so runs never share state.
    """
    assert CHROMIUM is not None
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={profile}",
        "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--virtual-time-budget={_SCRIPT_BUDGET_MS}",
        "--dump-dom", page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    assert result.returncode == 0 and "<html" in result.stdout, f"chromium failed:\n{result.stderr[-2000:]}"
    return result.stdout


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

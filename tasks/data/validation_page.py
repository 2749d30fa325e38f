"""The validation report as one self-contained HTML page, written from validation.json.

GX Data Docs load bootstrap, jQuery and their fonts from CDNs and render blank on an
air-gapped line; this page carries its own style and no script, so it opens anywhere,
from the disk or from `fanaoi serve-model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.data.dataset import SPLITS
from tasks.durable import atomic_write
from tasks.pages import render_page


def render_validation_page(result: dict[str, Any]) -> str:
    """The page for one validation result (the content of validation.json)."""
    return render_page("validation.html.j2", r=result, verdict="valid" if result["valid"] else "INVALID", splits=SPLITS)


def write_validation_page(result: dict[str, Any], path: Path) -> Path:
    """Write the page for ``result`` to ``path``; returns the path."""
    page = render_validation_page(result).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(page))
    return path

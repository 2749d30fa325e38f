"""The line's home page (GET /) and the index of reports/ (GET /reports/) of `fanaoi serve-model`.

Both are read from files at each request (the registry's log.jsonl, the ingest index, the
reports folder), so they are as fresh as the disk; nothing here imports Prefect or DVC.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from flows.project_status import CARD_METRICS, INDEX, LOG, noted, pending_batches, trained_snapshot
from tasks.data.validate import VALIDATION_PAGE
from tasks.pages import render_page
from tasks.registry.decisions import read_log

HOME_DECISIONS = 10  # the last nights an operator scans before opening `fanaoi history`
UI_ENV = "PREFECT_UI_URL"
REPORTS_URL = "/reports/"


def home_page(
    card: dict[str, Any], reload_error: str | None, *, registry_dir: Path, reports_dir: Path,
    project: Path, data_dir: str,
) -> str:
    """The home page: the champion in use, the last decisions, pending batches, links to every page."""
    problems: dict[str, str] = {}  # a damaged file's message; the page shows the rest
    decisions = noted(problems, LOG, lambda: read_log(registry_dir)[::-1][:HOME_DECISIONS], None)
    pending = noted(
        problems, INDEX, lambda: pending_batches(project, data_dir, trained_snapshot(project, data_dir)), None
    )
    explain = f"explain/{card['version']}/index.html"
    validation = card.get("metrics", {}).get("validation", {})
    return render_page(
        "home.html.j2",
        card=card,
        metrics={name: validation[name] for name in CARD_METRICS if name in validation},
        reload_error=reload_error,
        explain_url=REPORTS_URL + explain if (reports_dir / explain).is_file() else None,
        validation_url=REPORTS_URL + VALIDATION_PAGE if (reports_dir / VALIDATION_PAGE).is_file() else None,
        reports_url=REPORTS_URL,
        decisions=decisions,
        pending=pending,
        problems=problems,
        ui_url=(os.environ.get(UI_ENV) or "").rstrip("/") or None,
        ui_env=UI_ENV,
    )


def report_files(reports_dir: Path) -> list[dict[str, Any]]:
    """The files under ``reports_dir`` that /reports/ serves, sorted; no dotfiles, nothing outside it."""
    root = reports_dir.resolve()
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        for name in names:
            path = Path(folder) / name
            # Starlette serves no symlink that leaves the folder: listing one would be a dead link.
            if name.startswith(".") or not path.resolve().is_relative_to(root) or not path.is_file():
                continue
            status = path.stat()
            modified = datetime.fromtimestamp(status.st_mtime, UTC).isoformat(timespec="seconds")
            files.append({"path": path.relative_to(root).as_posix(), "bytes": status.st_size, "modified": modified})
    return sorted(files, key=lambda row: row["path"])


def reports_page(reports_dir: Path) -> str:
    """The index of reports/: one link per file, by path."""
    files = report_files(reports_dir) if reports_dir.is_dir() else []
    return render_page("reports.html.j2", files=files, reports_url=REPORTS_URL, reports_dir=str(reports_dir))


class ReportFiles(StaticFiles):
    """``reports/`` read-only (GET and HEAD; anything else 405), without its dotfiles.

    Starlette resolves each path, symlinks included, and serves nothing outside the
    folder, so ``../`` in any spelling is a 404. A reports folder not written yet is a 404
    too, not an error: the service may start before the first nightly run.
    """

    async def check_config(self) -> None:
        if self.directory is not None and os.path.isdir(self.directory):
            await super().check_config()

    async def get_response(self, path: str, scope: Scope) -> Response:
        # Dotfiles are a tool's state (partial writes, caches), not pages: the index leaves
        # them out, and a guessed name gets the same 404 as a missing file.
        if any(part.startswith(".") for part in PurePosixPath(path).parts):
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)

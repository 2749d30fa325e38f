"""dvc.yaml end to end in a throwaway git + DVC project: ingest, repro, params, diffs.

One project is shared by the steps, in order, because each `fanaoi` stage subprocess
starts TensorFlow; the assertions name the step that broke.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tasks.data.snapshot import data_snapshot_id
from tests.conftest import make_image_folder
from tests.dvc_support import BIN, make_pipeline_repo, run, tree_digest

STAGES = ("validate", "train", "evaluate", "gate")


SCREEN_ROWS, SCREEN_WIDTH = 40, 120


def assert_fits_one_screen(table: str) -> None:
    """Metrics worth diffing: a handful of numbers per stage, read at a glance after a retrain."""
    lines = table.splitlines()
    assert len(lines) <= SCREEN_ROWS and max(map(len, lines)) <= SCREEN_WIDTH, table


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def dvc(repo: Path, *args: str) -> str:
    return run(repo, str(BIN / "dvc"), *args).stdout


def fanaoi(repo: Path, *args: str, expect: int = 0) -> str:
    result = run(repo, str(BIN / "fanaoi"), *args, check=False)
    assert result.returncode == expect, f"fanaoi {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_ingest_repro_params_and_diffs(tmp_path: Path) -> None:
    repo = make_pipeline_repo(tmp_path / "repo", tmp_path / "remote")
    batch = make_image_folder(tmp_path / "batch", per_class=24, seed=5)

    # Ingest: 48 images under hash names, snapshot pushed and committed.
    out = fanaoi(repo, "ingest", str(batch), "--commit")
    snapshot = data_snapshot_id(repo)
    assert "48 accepted" in out and f"data snapshot {snapshot} (new)" in out
    assert len(list((repo / "data").rglob("*.png"))) == 48
    accepted = [line for line in out.splitlines() if line.startswith("accepted: ")]
    assert len(accepted) == 48  # a verdict per file, with where it went
    assert f"accepted: {batch / 'GO' / 'go_000.png'} -> data/GO/" in out
    assert list((tmp_path / "remote").rglob("*"))

    # First repro runs every stage in order; a second one runs nothing.
    assert stages_run(dvc(repo, "repro")) == list(STAGES)
    run(repo, "git", "add", "dvc.lock")
    run(repo, "git", "commit", "--quiet", "-m", "first run")
    assert stages_run(dvc(repo, "repro")) == []
    assert "up to date" in dvc(repo, "status")

    # A train param reruns train and what follows it, never validate.
    assert stages_run(dvc(repo, "exp", "run", "-S", "train.epochs=2")) == list(STAGES[1:])
    assert "up to date" in dvc(repo, "status")
    metrics = dvc(repo, "metrics", "diff")
    assert re.search(r"reports/train\.json\s+epochs\s+1\s+2\s+1", metrics)
    assert_fits_one_screen(metrics)
    header = dvc(repo, "metrics", "show").splitlines()[0]
    assert len(re.split(r"\s{2,}", header.strip())) - 1 <= SCREEN_ROWS, header  # columns, Path aside
    dvc(repo, "plots", "diff", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert all(title in page for title in ("Accuracy per epoch", "Confusion matrix", "ROC"))

    # The same batch again changes nothing.
    data_before = tree_digest(repo / "data")
    out = fanaoi(repo, "ingest", str(batch), "--quiet")
    assert "48 duplicate" in out and f"data snapshot {snapshot} (unchanged)" in out
    assert "duplicate: " not in out  # --quiet: only the files that need attention
    assert tree_digest(repo / "data") == data_before

    # A label conflict is rejected, both paths named, nothing added (exit 2).
    conflict = tmp_path / "conflict"
    (conflict / "NG").mkdir(parents=True)
    shutil.copy(batch / "GO" / "go_007.png", conflict / "NG" / "relabeled.png")
    out = fanaoi(repo, "ingest", str(conflict), expect=2)
    stored = next(p for p in (repo / "data" / "GO").iterdir()
                  if p.read_bytes() == (batch / "GO" / "go_007.png").read_bytes())
    assert f"label_conflict: {conflict / 'NG' / 'relabeled.png'}" in out
    assert f"data/GO/{stored.name} (labeled GO)" in out
    assert tree_digest(repo / "data") == data_before and data_snapshot_id(repo) == snapshot

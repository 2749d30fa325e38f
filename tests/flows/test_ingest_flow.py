"""The ingest-batch flow under the temporary Prefect API, on a copy of the nightly project."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from flows.ingest import REPORT_KEY, ingest_batch_flow
from flows.stages import stage_changes
from tasks.data.dataset import sha256_of
from tasks.data.ingest_transaction import IngestError
from tasks.data.snapshot import data_snapshot_id
from tests.conftest import make_image_folder
from tests.dvc_support import tree_digest
from tests.flows.test_nightly import artifacts, task_runs

NEW_PER_CLASS = 3


def make_batch(folder: Path, data: Path) -> Path:
    """Three new images per class, plus a duplicate, a label conflict, a cut file and notes."""
    make_image_folder(folder, per_class=NEW_PER_CLASS, seed=11)
    shutil.copy(data / "GO" / "go_000.png", folder / "GO" / "again.png")
    shutil.copy(data / "GO" / "go_001.png", folder / "NG" / "relabeled.png")
    (folder / "GO" / "cut.png").write_bytes((folder / "GO" / "go_000.png").read_bytes()[:200])
    (folder / "GO" / "notes.txt").write_text("lot 4711\n")
    return folder


@pytest.fixture(scope="module")
def first_ingest(
    nightly_project: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A copy of the project after its first nightly run, and one ingest of a mixed batch."""
    root = tmp_path_factory.mktemp("ingest-flow")
    project = Path(shutil.copytree(nightly_project["project"], root / "project", symlinks=True))
    batch = make_batch(root / "batch", project / "data")
    before = {"snapshot": data_snapshot_id(project), "batch": tree_digest(batch)}
    state = ingest_batch_flow(str(batch), str(project / "params.yaml"), return_state=True)
    return {"project": project, "batch": batch, "before": before, "state": state}


def verdicts(result: dict[str, Any]) -> dict[str, str]:
    return {f"{Path(row['path']).parent.name}/{Path(row['path']).name}": row["verdict"]
            for row in result["files"]}


def test_ingest_flow_adds_the_accepted_files_and_snapshots_them(first_ingest: dict[str, Any]) -> None:
    project, batch, state = first_ingest["project"], first_ingest["batch"], first_ingest["state"]
    assert state.is_completed(), state.message
    result = state.result()

    new = {f"{name}/{name.lower()}_{i:03d}.png" for name in ("GO", "NG") for i in range(NEW_PER_CLASS)}
    assert verdicts(result) == {
        **dict.fromkeys(new, "accepted"),
        "GO/again.png": "duplicate", "NG/relabeled.png": "label_conflict",
        "GO/cut.png": "unreadable", "GO/notes.txt": "unexpected",
    }
    assert (result["accepted"], result["rejected"]) == (6, 3)
    for name in new:
        source = batch / name
        stored = project / "data" / name.split("/")[0] / f"{sha256_of(source)}.png"
        assert stored.read_bytes() == source.read_bytes()
    assert tree_digest(batch) == first_ingest["before"]["batch"]  # originals only read

    ingest_run = task_runs(state, ("ingest",))["ingest"]
    assert (ingest_run.state.name, ingest_run.run_count) == ("Completed", 1)
    assert task_runs(state).keys() == {"ingest"}

    snapshot = result["snapshot"]
    assert snapshot["changed"] and snapshot["pushed"]
    assert data_snapshot_id(project) == snapshot["md5"] != first_ingest["before"]["snapshot"]
    # The next nightly run sees the new snapshot and retrains.
    assert stage_changes(project, "validate")


def test_ingest_flow_shows_the_verdicts_in_the_dashboard(first_ingest: dict[str, Any]) -> None:
    state, project = first_ingest["state"], first_ingest["project"]
    report = artifacts(state)[REPORT_KEY]
    assert report.type == "markdown"
    assert "accepted: **6**, rejected: **3**" in report.data
    assert f"`{data_snapshot_id(project)}` (new)" in report.data
    rows = {line.split("|")[1].strip(" `"): line for line in report.data.splitlines()
            if line.startswith("| `")}
    batch = first_ingest["batch"]
    assert set(rows) == {str(batch / name) for name in
                         ("GO/again.png", "NG/relabeled.png", "GO/cut.png", "GO/notes.txt")}
    assert "data/GO/go_001.png (labeled GO)" in rows[str(batch / "NG" / "relabeled.png")]
    assert "| unreadable |" in rows[str(batch / "GO" / "cut.png")]


def test_reingesting_the_same_batch_changes_nothing(first_ingest: dict[str, Any]) -> None:
    project, batch = first_ingest["project"], first_ingest["batch"]
    data_before = tree_digest(project / "data")
    pointer_before = (project / "data.dvc").read_bytes()

    state = ingest_batch_flow(str(batch), str(project / "params.yaml"), return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result["accepted"] == 0
    assert result["counts"]["duplicate"] == 2 * NEW_PER_CLASS + 1
    assert not result["snapshot"]["changed"]
    assert tree_digest(project / "data") == data_before
    assert (project / "data.dvc").read_bytes() == pointer_before
    report = artifacts(state)[REPORT_KEY].data
    assert "accepted: **0**" in report and "(unchanged)" in report


def test_missing_batch_fails_at_once_and_changes_nothing(first_ingest: dict[str, Any]) -> None:
    project = first_ingest["project"]
    data_before = tree_digest(project / "data")
    missing = project.parent / "no-such-batch"

    state = ingest_batch_flow(str(missing), str(project / "params.yaml"), return_state=True)

    assert state.is_failed()
    with pytest.raises(IngestError, match="no-such-batch: batch folder not found"):
        state.result()
    ingest_run = task_runs(state, ("ingest",))["ingest"]
    assert ingest_run.state.name == "Failed"
    assert ingest_run.run_count == 1  # a wrong path does not heal by retrying
    assert REPORT_KEY not in artifacts(state)
    assert tree_digest(project / "data") == data_before

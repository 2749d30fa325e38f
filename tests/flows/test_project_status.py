"""`fanaoi status` and `fanaoi history` on a project whose files were damaged or hand-edited.

Each damaged file is one line naming it and the fix; status still shows everything else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main

LOG_LINE = {"time": "2026-11-20T03:00:00+00:00", "action": "reject", "version": None,
            "metric": "accuracy", "value": 0.9, "escape_rate": 0.01, "overkill_rate": 0.02,
            "reasons": ["worse"], "failed": ["accuracy"]}
CARD = {"version": "v0001", "time": "2026-11-19T03:00:00+00:00", "action": "promote",
        "threshold": 0.5, "data_snapshot": "abc.dir",
        "metrics": {"validation": {"accuracy": 0.98, "escape_rate": 0.0, "count": 50}}}
SOURCE = {"file": "data/GO/a.png", "batch": "/batches/b1", "ingested_at": "2026-11-20T02:00:00+00:00"}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with a (model-less) registry, a data folder, data.dvc, dvc.lock and an ingest index."""
    project = tmp_path / "project"
    (project / "registry").mkdir(parents=True)
    (project / "data" / "GO").mkdir(parents=True)
    (project / "data" / "GO" / "a.png").write_bytes(b"png")
    (project / "params.yaml").write_text("{}\n")
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "data.dvc").write_text("outs:\n- md5: abc.dir\n  nfiles: 2\n  size: 10\n  path: data\n")
    (project / "dvc.lock").write_text("stages:\n  train:\n    deps:\n    - path: data\n      md5: abc.dir\n")
    (project / "data" / ".sources.jsonl").write_text(json.dumps(SOURCE) + "\n")
    listing = project / ".dvc" / "cache" / "files" / "md5" / "ab" / "c.dir"  # what abc.dir trained on
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps([{"relpath": "GO/old.png", "md5": "0" * 32}]))
    (project / "registry" / "log.jsonl").write_text(json.dumps(LOG_LINE) + "\n")
    (project / "registry" / "champion.json").write_text(json.dumps(CARD))
    monkeypatch.chdir(project)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # no profile naming a server
    return project


def run(*argv: str) -> int:
    return main(["--params", "params.yaml", *argv])


NOT_AN_OBJECT = "Input should be a valid dictionary"
LINE_FIX = "repair or delete that line"
# case: (file, its damaged text, what the one line about it says)
DAMAGE = {
    "log line not an object": ("registry/log.jsonl", "[1]\n", f"log.jsonl:1: {NOT_AN_OBJECT}; {LINE_FIX}"),
    "log line time a number": (
        "registry/log.jsonl", json.dumps({**LOG_LINE, "time": 5}) + "\n",
        "log.jsonl:1: time: Input should be a valid string",
    ),
    "sources line not an object": ("data/.sources.jsonl", "[1]\n", f".sources.jsonl:1: {NOT_AN_OBJECT}; {LINE_FIX}"),
    "sources batch a list": (
        "data/.sources.jsonl", json.dumps({**SOURCE, "batch": ["b"]}) + "\n",
        ".sources.jsonl:1: batch: Input should be a valid string",
    ),
    "dvc.lock deps of numbers": (
        "dvc.lock", "stages:\n  train:\n    deps: [1, 2]\n",
        f"dvc.lock: stages.train.deps.0: {NOT_AN_OBJECT}; restore it with `git checkout -- dvc.lock`",
    ),
    "data.dvc nfiles many": (
        "data.dvc", "outs:\n- md5: abc.dir\n  nfiles: many\n",
        "data.dvc: outs.0.nfiles: Input should be a valid integer; restore it with `git checkout -- data.dvc`",
    ),
}


@pytest.mark.parametrize(("file", "text", "message"), DAMAGE.values(), ids=DAMAGE.keys())
def test_status_names_a_damaged_file_and_shows_the_rest(project, capsys, file, text, message) -> None:
    (project / file).write_text(text)
    assert run("status") == 0
    out = capsys.readouterr().out
    (damaged,) = [line for line in out.splitlines() if line.startswith("DAMAGED")]
    assert message in damaged and str(project) in damaged
    labels = [line.split()[0] for line in out.splitlines()]
    assert labels.count("agree") + labels.count("DISAGREE") == 3
    assert {"champion", "nightly", "data", "new"} <= set(labels)

    assert run("status", "--json") == 0
    state = json.loads(capsys.readouterr().out)
    assert [message in problem for problem in state["data"]["problems"].values()] == [True]


@pytest.mark.parametrize("argv", [["history"], ["history", "--at", "2026-11-21"]])
def test_history_names_a_damaged_log_line_in_one_line(project, capsys, argv) -> None:
    (project / "registry" / "log.jsonl").write_text(json.dumps(LOG_LINE) + "\n" + '"promote"\n')
    assert run(*argv) == 1
    err = capsys.readouterr().err
    assert err == f"fanaoi history: error: registry/log.jsonl:2: {NOT_AN_OBJECT}; {LINE_FIX}\n"


@pytest.mark.parametrize("change", [{"metrics": [1]}, {"time": 5}], ids=["metrics a list", "time a number"])
def test_a_damaged_card_without_its_model_is_an_unusable_champion(project, capsys, caplog, change) -> None:
    (project / "registry" / "champion.json").write_text(json.dumps({**CARD, **change}))
    assert run("status") == 0
    champion = capsys.readouterr().out.splitlines()[0]
    assert champion.startswith("champion    ? UNUSABLE: ") and "champion.h5: model file not found" in champion
    (key,) = change
    assert f"champion.json: {key}: " in caplog.text and "using the card inside the model" in caplog.text
    assert run("champion") == 1
    assert "champion.h5: model file not found" in capsys.readouterr().err


def test_history_shows_a_decision_on_an_undefined_metric(project, capsys) -> None:
    (project / "registry" / "log.jsonl").write_text(json.dumps({**LOG_LINE, "metric": "roc_auc", "value": None}))
    assert run("history") == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("2026-11-20T03:00:00+00:00 reject   -       -        -")


def test_history_says_which_metric_decided_at_the_ceiling_and_which_rejection_was_a_tie(project, capsys) -> None:
    at_ceiling = {**LOG_LINE, "metric": "log_loss", "value": 0.0213, "saturated": True}
    lines = [{**at_ceiling, "failed": ["at the ceiling log loss decides: ...: FAIL"], "tie": True},
             {**at_ceiling, "action": "promote", "version": "v0002", "failed": [], "tie": False}]
    (project / "registry" / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run("history") == 0
    tie, promoted = capsys.readouterr().out.splitlines()[1:]
    assert "log_loss 0.0213" in tie
    assert tie.endswith("tie at the ceiling (log_loss decided, the primary metric saturated): "
                        "at the ceiling log loss decides: ...: FAIL")
    assert promoted.endswith("every rule passed; log_loss decided, the primary metric saturated")


def test_an_intact_project_has_no_problems(project, capsys) -> None:
    assert run("status", "--json") == 0
    state = json.loads(capsys.readouterr().out)
    assert state["data"]["problems"] == {}
    assert state["champion"]["version"] == "v0001" and state["champion"]["age_seconds"] > 0
    assert [row["batch"] for row in state["data"]["pending_batches"]] == ["/batches/b1"]
    assert run("history") == 0
    assert "reject" in capsys.readouterr().out


@pytest.mark.integration
def test_status_tells_whether_data_holds_the_snapshot_without_listing_data(tmp_path, monkeypatch, capsys) -> None:
    """Its time does not grow with the number of images: one stat per folder, no walk of data/."""
    import os

    from tasks.data.snapshot import snapshot_data
    from tests.conftest import make_image_folder
    from tests.dvc_support import make_dvc_repo

    repo = make_dvc_repo(tmp_path / "repo", remote=None)
    (repo / "params.yaml").write_text("validate:\n  cache_dir: .cache\n")
    make_image_folder(repo / "data", per_class=3)
    snapshot_data(repo, "data", push=False, stamp_dir=".cache")
    monkeypatch.chdir(repo)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    listed: list[str] = []
    for name in ("scandir", "listdir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path=".", real=real: listed.append(os.fspath(path)) or real(path))

    def data_check() -> dict:
        assert run("status", "--json") == 0
        return json.loads(capsys.readouterr().out)["agreement"][0]

    assert data_check()["ok"] and data_check()["detail"].startswith("6 files")
    (repo / "data" / "NG" / "new.png").write_bytes(b"png")
    changed = data_check()
    assert not [path for path in listed if Path(path).resolve().is_relative_to(repo / "data")]
    assert not changed["ok"] and "added, removed or renamed in data/NG since" in changed["detail"]

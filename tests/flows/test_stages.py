from pathlib import Path

import pytest

import flows.stages
from flows.stages import pipeline_changes
from tests.dvc_support import BIN, make_dvc_repo, run

DVC_YAML = """stages:
  copy:
    cmd: cp a.txt b.txt
    deps: [a.txt, inputs]
    params: [threshold]
    outs: [b.txt]
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = make_dvc_repo(tmp_path / "repo", remote=None)
    (repo / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    (repo / "params.yaml").write_text("threshold: 1\n", encoding="utf-8")
    (repo / "a.txt").write_text("a\n", encoding="utf-8")
    (repo / "inputs").mkdir()
    for index in range(3):
        (repo / "inputs" / f"{index}.txt").write_text(f"{index}\n", encoding="utf-8")
    run(repo, str(BIN / "dvc"), "repro", "--quiet")
    return repo


@pytest.mark.integration
def test_the_stamp_answers_while_nothing_changed_and_any_change_asks_dvc(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, ...]] = []
    real_ask = flows.stages._ask_dvc

    def counted(repo_dir: Path, stages: tuple[str, ...]) -> dict[str, list[str]]:
        asked.append(tuple(stages))
        return real_ask(repo_dir, stages)

    monkeypatch.setattr(flows.stages, "_ask_dvc", counted)
    assert pipeline_changes(repo, ["copy"], ".fanaoi") == {"copy": []} and len(asked) == 1
    assert pipeline_changes(repo, ["copy"], ".fanaoi") == {"copy": []} and len(asked) == 1
    monkeypatch.chdir(repo)
    assert pipeline_changes(Path("."), ["copy"], ".fanaoi") == {"copy": []} and len(asked) == 1

    (repo / "inputs" / "3.txt").write_text("new\n", encoding="utf-8")
    changes = pipeline_changes(repo, ["copy"], ".fanaoi")
    assert len(asked) == 2 and "inputs" in changes["copy"][0]
    run(repo, str(BIN / "dvc"), "repro", "--quiet")
    assert pipeline_changes(repo, ["copy"], ".fanaoi") == {"copy": []} and len(asked) == 3

    (repo / "params.yaml").write_text("threshold: 2\n", encoding="utf-8")
    changes = pipeline_changes(repo, ["copy"], ".fanaoi")
    assert len(asked) == 4 and "params.yaml" in changes["copy"][0]
    assert pipeline_changes(repo, ["copy"], ".fanaoi") == changes and len(asked) == 5

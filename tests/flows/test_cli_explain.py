"""`fanaoi explain` over a registry, and the nightly report's link to its page."""

import re

import pytest

from flows.cli import main
from tasks.nightly_report import report_markdown
from tests.tasks.champion_support import (
    copy_registry,
    gate_candidate,
    gate_params,
    one_version_registry,
    save_random_model,
    write_params_file,
)


@pytest.fixture
def project(trained_workspace, tmp_path_factory, tmp_path):
    data_dir, base = trained_workspace["data_dir"], tmp_path_factory.getbasetemp()
    registry = copy_registry(one_version_registry(data_dir, base), tmp_path / "registry")
    params_file = write_params_file(tmp_path / "params.yaml", data_dir, registry)
    return {"params": str(params_file), "tmp": tmp_path}


@pytest.mark.slow
def test_explain_the_champion_by_default(project, capsys):
    reports = project["tmp"] / "reports"
    assert main(["--params", project["params"], "explain", "--reports", str(reports)]) == 0
    out = capsys.readouterr().out
    found = re.match(r"v0001: (\d+) escape\(s\), (\d+) overkill\(s\) on (\d+) validation images", out)
    assert found, out
    index = reports / "explain" / "v0001" / "index.html"
    assert f"report: {index}" in out
    page = index.read_text(encoding="utf-8")
    assert "from the model card of v0001" in page
    assert "holds no training history" in page  # the registry keeps no history.csv
    pictures = list((index.parent / "heatmaps").glob("*.png"))
    assert len(pictures) == int(found.group(1)) + int(found.group(2))
    assert (index.parent / "filters.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "v9"], "versions/v0009: no such published version; versions: v0001"),
        (["explain", "--model", "missing.h5"], "missing.h5: model file not found"),
        (["explain", "v1", "--model", "x.h5"], "give a VERSION or --model PATH, not both"),
    ],
)
def test_explain_errors_are_one_line(project, capsys, argv, message):
    assert main(["--params", project["params"], *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_nightly_report_links_the_explain_page_when_it_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the flow writes its report from the project folder
    summary = {
        "decision": "promote", "last_decision": "promote", "reasons": [],
        "stages": {"gate": "ran"}, "data_snapshot": "abc.dir", "data_changed": False,
        "published_version": "v0002", "champion_version": "v0002",
        "champion_path": "/r/champion.h5", "candidate_path": "/m/candidate.h5",
        "metrics": [], "kept_epoch_vs_evaluate": {}, "reports_url": "http://line-7:8000/reports",
        "reports_dir": "reports",
    }
    assert "`fanaoi explain v0002` writes reports/explain/v0002/index.html" in report_markdown(summary)
    page = tmp_path / "reports" / "explain" / "v0002" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html></html>")
    link = "[reports/explain/v0002/index.html](http://line-7:8000/reports/explain/v0002/index.html)"
    assert link in report_markdown(summary)
    assert "look inside" not in report_markdown({**summary, "champion_version": None})


@pytest.mark.slow
def test_a_published_version_keeps_its_training_curves(trained_workspace, tmp_path, capsys):
    from tasks.model.history import write_history
    from tasks.registry.publish import publish

    data_dir, registry, reports = trained_workspace["data_dir"], tmp_path / "registry", tmp_path / "reports"
    params = gate_params(data_dir, registry)
    candidate = save_random_model(params, tmp_path / "candidate.h5")
    write_history([{"epoch": epoch, "accuracy": 0.5 + epoch / 10, "loss": 1 / epoch, "val_accuracy": 0.5,
                    "val_loss": 1.1 / epoch, "learning_rate": 0.001} for epoch in (1, 2, 3)],
                  reports / "history.csv")
    publish(candidate, gate_candidate(params, candidate, reports, record=False), params, force_reason="curves")
    kept = registry / "versions" / "v0001" / "history.csv"
    assert kept.read_bytes() == (reports / "history.csv").read_bytes()

    (reports / "history.csv").unlink()  # the next run's reports: the version keeps its own
    params_file = write_params_file(tmp_path / "params.yaml", data_dir, registry)
    assert main(["--params", str(params_file), "explain", "v1", "--reports", str(reports)]) == 0
    capsys.readouterr()
    page = (reports / "explain" / "v0001" / "index.html").read_text(encoding="utf-8")
    assert f"from {kept}" in page and "Accuracy per epoch" in page and "Loss per epoch" in page

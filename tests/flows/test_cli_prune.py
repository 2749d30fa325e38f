"""`fanaoi prune`: the pruned model is written as a candidate and judged by `fanaoi gate`."""

import json
import re

import pytest

from flows.cli import main
from tasks.data.dataset import sha256_of
from tests.tasks.champion_support import copy_registry, good_model, one_version_registry, write_params_file


@pytest.fixture
def project(trained_workspace, tmp_path_factory, tmp_path):
    """A params file over a copy of a registry whose champion v0001 is the good tiny model."""
    data_dir, base = trained_workspace["data_dir"], tmp_path_factory.getbasetemp()
    registry = copy_registry(one_version_registry(data_dir, base), tmp_path / "registry")
    params = write_params_file(tmp_path / "params.yaml", data_dir, registry)
    return {"params": str(params), "source": good_model(data_dir, base), "tmp": tmp_path}


@pytest.mark.slow
def test_prune_writes_a_candidate_that_the_gate_compares_with_the_champion(project, capsys):
    source, tmp = project["source"], project["tmp"]
    source_sha256 = sha256_of(source)
    out, reports = tmp / "models" / "candidate.h5", tmp / "reports"
    code = main(["--params", project["params"], "prune", "--fraction", "0.25", "--model", str(source),
                 "--out", str(out), "--epochs", "1", "--reports", str(reports)])
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"pruned \w+ 8->6, \w+ 16->12 filters", printed)
    for row in ("parameters", "file size (KB)", "predict images/s", "validation accuracy", "escape rate"):
        assert re.search(rf"^{re.escape(row)} +\S+ +\S+ +\S+$", printed, re.MULTILINE), row
    assert f"fanaoi gate --model {out}" in printed
    report = json.loads((reports / "prune.json").read_text())
    assert report["out"] == str(out) and report["fraction"] == 0.25
    assert sha256_of(source) == source_sha256  # the source model is left as it was

    code = main(["--params", project["params"], "gate", "--model", str(out), "--reports", str(reports),
                 "--no-publish"])
    assert code == 0
    gate = json.loads((reports / "gate-preview.json").read_text())  # --no-publish: not gate.json
    assert gate["candidate"]["path"] == str(out)
    assert gate["champion"]["version"] == "v0001"
    assert gate["candidate"]["metrics"]["accuracy"] == pytest.approx(report["after"]["validation_accuracy"])
    assert f"decision: {gate['decision'].upper()}" in capsys.readouterr().out


def test_prune_of_a_missing_model_names_it(project, capsys):
    missing = project["tmp"] / "nothing.h5"
    code = main(["--params", project["params"], "prune", "--model", str(missing), "--out",
                 str(project["tmp"] / "c.h5")])
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith(f"fanaoi prune: error: {missing}: model file not found")
    assert len(error.strip().splitlines()) == 1

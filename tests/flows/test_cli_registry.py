"""The registry commands of the CLI: gate, promote, champion, history, rollback, predict."""

import io
import json

import pytest

from flows.cli import main
from tasks.registry.decisions import read_log
from tasks.registry.store import CHAMPION_MODEL
from tests.bad_files import HOSTILE_IMAGES
from tests.tasks.champion_support import (
    copy_registry,
    flip_weight_bytes,
    one_version_registry,
    save_random_model,
    two_version_registry,
    write_params_file,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def project(trained_workspace, tmp_path_factory, tmp_path):
    """A params file, a copy of the two-version registry (v0002 champion) and a weak candidate."""
    data_dir, base = trained_workspace["data_dir"], tmp_path_factory.getbasetemp()
    registry = copy_registry(two_version_registry(data_dir, base), tmp_path / "registry")
    params_file = write_params_file(tmp_path / "params.yaml", data_dir, registry)
    return {"data_dir": data_dir, "base": base, "registry": registry, "params": str(params_file), "tmp": tmp_path}


def run(project, *argv):
    return main(["--params", project["params"], *argv])


def test_champion_shows_the_card(project, capsys):
    assert run(project, "champion") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"champion v0002  {project['registry'] / CHAMPION_MODEL}")
    assert "force: line test" in out and "GO=0, NG=1" in out and "32x32 rgb" in out
    assert run(project, "champion", "--json") == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v0002"


def test_history_lists_decisions_and_answers_at(project, capsys):
    assert run(project, "history") == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[1] for row in rows[1:]] == ["promote", "force"]
    assert rows[2].split()[2:4] == ["v0002", "v0001"] and rows[2].endswith("forced by operator: line test")
    promoted, forced = (entry["time"] for entry in read_log(project["registry"]))
    assert run(project, "history", "--at", promoted) == 0
    assert capsys.readouterr().out.startswith(f"champion at {promoted}: v0001 (promote")
    assert run(project, "history", "--at", "2000-01-01") == 0
    assert capsys.readouterr().out.strip() == "champion at 2000-01-01: none"


def test_rollback_then_champion(project, capsys):
    first = (one_version_registry(project["data_dir"], project["base"]) / CHAMPION_MODEL).read_bytes()
    assert run(project, "rollback", "v1", "--reason", "v2 rejects good fans") == 0
    assert "champion is now v0001" in capsys.readouterr().out
    assert (project["registry"] / CHAMPION_MODEL).read_bytes() == first
    assert run(project, "champion") == 0
    assert capsys.readouterr().out.startswith("champion v0001")


def test_worse_candidate_is_rejected_and_nothing_changes(project, capsys):
    champion = project["registry"] / CHAMPION_MODEL
    before = champion.read_bytes()
    assert run(project, "rollback", "1") == 0  # the good model is champion again
    good = champion.read_bytes()
    weak = save_random_model(main_params(project), project["tmp"] / "weak.h5", seed=11)
    capsys.readouterr()
    assert run(project, "gate", "--model", str(weak), "--reports", str(project["tmp"] / "reports")) == 0
    out = capsys.readouterr().out
    assert out.startswith("decision: REJECT") and "FAIL" in out and "published" not in out
    assert champion.read_bytes() == good != before
    assert read_log(project["registry"])[-1]["action"] == "reject"
    gate = json.loads((project["tmp"] / "reports" / "gate-details.json").read_text())
    assert gate["decision"] == "reject" and gate["champion"]["version"] == "v0001"


def main_params(project):
    from flows.params import load_params

    return load_params(project["params"])


def test_corrupt_champion_gives_one_line_errors_and_gate_still_decides(project, capsys):
    champion = project["registry"] / CHAMPION_MODEL
    champion.write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    assert run(project, "champion") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"fanaoi champion: error: {champion}: not a readable .h5 file")
    assert "fanaoi rollback VERSION` (versions: v0001, v0002)" in err
    image = next((project["data_dir"] / "GO").iterdir())
    assert run(project, "predict", str(image)) == 1
    assert str(champion) in capsys.readouterr().err
    weak = save_random_model(main_params(project), project["tmp"] / "weak.h5", seed=11)
    reports = str(project["tmp"] / "reports")
    assert run(project, "gate", "--no-publish", "--model", str(weak), "--reports", reports) == 0
    out = capsys.readouterr().out
    assert "champion v0002 is unusable" in out and "floors only" in out and "REJECT" in out
    assert len(read_log(project["registry"])) == 2  # --no-publish records nothing


def test_predict_prints_label_and_probability_per_file(project, capsys):
    assert run(project, "rollback", "1") == 0
    folder = project["data_dir"] / "NG"
    bad = project["tmp"] / "bad.png"
    bad.write_text("no image")
    capsys.readouterr()
    assert run(project, "predict", str(folder), str(bad), "--json") == 1
    result = json.loads(capsys.readouterr().out)
    assert result["champion"] == "v0001" and result["positive_class"] == "NG"
    rows = result["results"]
    assert len(rows) == len(list(folder.iterdir())) + 1
    assert rows[-1]["path"] == str(bad) and rows[-1]["error"]
    assert sum(row["label"] == "NG" for row in rows[:-1]) >= 0.8 * (len(rows) - 1)
    one = next(folder.iterdir())
    assert run(project, "predict", str(one)) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{one}  NG  p(NG)=") or line.startswith(f"{one}  GO  p(NG)=")


def test_predict_reports_a_refused_image_as_an_error_never_a_label(project, capsys):
    hostile = [write(project["tmp"] / name) for name, write in HOSTILE_IMAGES.items()]
    good = next((project["data_dir"] / "GO").iterdir())
    capsys.readouterr()

    assert run(project, "predict", *map(str, hostile), str(good)) == 1

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(hostile) + 1
    for path, line in zip(hostile, lines, strict=False):
        assert line.startswith(f"{path}  error: "), line
        assert "p(NG)" not in line
    assert "decompression bomb: 64,000,000 pixels" in lines[-2]
    assert lines[-1].startswith(f"{good}  ") and "p(NG)=" in lines[-1]


def test_damaged_champion_weights_are_an_error_naming_the_fix_not_a_label(project, capsys):
    flip_weight_bytes(project["registry"] / CHAMPION_MODEL)
    image = next((project["data_dir"] / "GO").iterdir())

    assert run(project, "predict", str(image)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "is not that of v0002 as published" in captured.err
    assert captured.err.strip().endswith("restore it with `fanaoi rollback v0002`")
    assert run(project, "rollback", "v0002") == 0
    capsys.readouterr()
    assert run(project, "predict", str(image)) == 0


def test_a_champion_json_that_is_not_an_object_breaks_no_command(project, capsys):
    (project["registry"] / "champion.json").write_text('["v0002"]')
    image = next((project["data_dir"] / "GO").iterdir())
    assert run(project, "champion") == 0
    assert capsys.readouterr().out.startswith("champion v0002")
    assert run(project, "predict", str(image)) == 0
    reports = str(project["tmp"] / "reports")
    weak = save_random_model(main_params(project), project["tmp"] / "weak.h5", seed=11)
    assert run(project, "gate", "--no-publish", "--model", str(weak), "--reports", reports) == 0
    assert "champion v0002" in capsys.readouterr().out
    assert run(project, "rollback", "v0001") == 0
    assert json.loads((project["registry"] / "champion.json").read_text())["version"] == "v0001"


def test_gate_no_publish_leaves_the_gate_metric_alone(project, capsys):
    reports = project["tmp"] / "reports"
    reports.mkdir()
    metric = reports / "gate.json"
    metric.write_text('{"decision": "promote", "from": "the last dvc repro"}\n')
    before = metric.read_bytes(), metric.stat().st_mtime_ns
    weak = save_random_model(main_params(project), project["tmp"] / "weak.h5", seed=11)
    log_before = read_log(project["registry"])

    assert run(project, "gate", "--no-publish", "--model", str(weak), "--reports", str(reports)) == 0

    assert (metric.read_bytes(), metric.stat().st_mtime_ns) == before
    preview = json.loads((reports / "gate-preview.json").read_text())
    assert preview["decision"] == "reject" and preview["candidate"]["path"] == str(weak)
    out = capsys.readouterr().out
    assert f"report: {reports / 'gate-preview.json'} (nothing published or logged" in out
    assert read_log(project["registry"]) == log_before


def test_promote_without_force_asks_and_a_no_publishes_nothing(project, capsys, monkeypatch):
    champion = project["registry"] / CHAMPION_MODEL
    before, log_before = champion.read_bytes(), read_log(project["registry"])
    weak = save_random_model(main_params(project), project["tmp"] / "weak.h5", seed=11)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))

    reports = str(project["tmp"] / "reports")
    assert run(project, "promote", "--reason", "try", "--model", str(weak), "--reports", reports) == 1

    captured = capsys.readouterr()
    assert "over this decision?" in captured.err and captured.out.rstrip().endswith("not published")
    assert champion.read_bytes() == before and read_log(project["registry"]) == log_before


# An operator's reason that tries to add a row of its own to `fanaoi history` and clear the screen.
FORGED_REASON = "v2 bad\n2026-01-01T00:00:00+00:00    promote  v0009   v0002    accuracy 1.0000\x1b[2J"


def test_history_prints_one_row_per_entry_whatever_a_reason_holds(tmp_path, capsys):
    """A log written before reasons were escaped (or edited by hand) still gives one row per entry."""
    registry = tmp_path / "registry"
    registry.mkdir()
    entries = [{"time": "2026-11-20T03:00:00+00:00", "action": "rollback", "version": "v0001",
                "previous": "v0002", "reasons": [FORGED_REASON]},
               {"time": "2026-11-21T03:00:00+00:00", "action": "reject", "version": None, "previous": "v0001",
                "reasons": ["accuracy 0.5 < 0.95"], "failed": ["accuracy 0.5 < 0.95"]}]
    (registry / "log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    params = tmp_path / "params.yaml"
    params.write_text(f"registry:\n  dir: {registry}\n")

    assert main(["--params", str(params), "history"]) == 0

    out = capsys.readouterr().out
    header, rolled_back, rejected = out.splitlines()
    assert rolled_back.endswith(FORGED_REASON.replace("\n", r"\n").replace("\x1b", r"\x1b"))
    assert rejected.split()[1] == "reject" and "\x1b" not in out


def test_history_lists_a_version_folder_that_has_no_log_line(tmp_path, capsys):
    """A version published by a run killed before its log line (or a line deleted by hand) is shown, marked."""
    registry = tmp_path / "registry"
    for version in ("v0001", "v0002"):
        (registry / "versions" / version).mkdir(parents=True)
    entry = {"time": "2026-11-20T03:00:00+00:00", "action": "promote", "version": "v0001", "previous": None,
             "reasons": ["every rule passed"], "failed": []}
    (registry / "log.jsonl").write_text(json.dumps(entry) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text(f"registry:\n  dir: {registry}\n")

    assert main(["--params", str(params), "history"]) == 0

    header, promoted, unlogged = capsys.readouterr().out.splitlines()
    assert promoted.split()[1:3] == ["promote", "v0001"]
    assert unlogged.split()[1:3] == ["unlogged", "v0002"]
    assert "no line in log.jsonl" in unlogged and str(registry / "versions" / "v0002") in unlogged

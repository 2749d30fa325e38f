import subprocess
import sys

import pytest

from flows.cli import main
from tests.conftest import heavy_packages_imported_by, make_image_folder
from tests.dvc_support import BIN, tool_env
from tests.flows.conftest import make_flow_project


def test_help_does_not_import_heavy_packages():
    assert heavy_packages_imported_by("import typer.main; from flows.cli import app; typer.main.get_command(app)") == []


def test_bad_data_folder_gives_one_line_error_and_nothing_to_train_on(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=2)
    (data / "SCRAP").mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  dir: {data}\nvalidate:\n  min_per_class: 1\n")
    reports = tmp_path / "reports"
    code = main(["--params", str(params), "validate", "--reports", str(reports)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "data/SCRAP: unexpected folder" in err
    code = main(["--params", str(params), "train", "--model", str(tmp_path / "m" / "c.h5"), "--reports", str(reports)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "manifest.csv: no manifest; run `fanaoi validate`" in err
    assert not (tmp_path / "m").exists()


def test_a_huge_input_size_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "data", per_class=2)
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  dir: {data}\nmodel:\n  input_size: [100000, 100000]\n"
                      f"train:\n  checkpoint_dir: {tmp_path / 'checkpoints'}\n")
    monkeypatch.chdir(tmp_path)
    code = main(["--params", str(params), "train", "--model", str(tmp_path / "m" / "c.h5")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "model.input_size.0 must be <= 2048, got 100000" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "params.yaml"]


def test_a_huge_batch_size_option_is_bounded_like_the_param(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"registry:\n  dir: {tmp_path / 'registry'}\n")
    assert main(["--params", str(params), "predict", str(tmp_path), "--batch-size", "100000"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evaluate.batch_size must be between 1 and 1024, got 100000" in err


@pytest.mark.parametrize("argv", [["--params", "/nonexistent/params.yaml", "train"]])
def test_missing_params_file_is_reported(argv, capsys):
    assert main(argv) == 1
    assert "params.yaml: not found" in capsys.readouterr().err


def test_serve_refuses_without_a_prefect_server(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))
    code = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve"], capture_output=True, text=True, check=False, timeout=120,
    )
    assert code.returncode == 1
    assert code.stderr.count("\n") == 1
    assert "prefect server start" in code.stderr and "PREFECT_API_URL" in code.stderr


@pytest.mark.integration
def test_ingest_prints_a_file_name_with_a_newline_on_one_line(tmp_path, monkeypatch, capsys):
    from tests.dvc_support import make_dvc_repo

    repo = make_dvc_repo(tmp_path / "repo", remote=None)
    (repo / "params.yaml").write_text("validate:\n  min_per_class: 1\n")
    batch = make_image_folder(tmp_path / "batch", per_class=1)
    forged = "go\naccepted: passwd -> data:GO:forged"  # no "/": it cannot be in a name
    (batch / "GO" / "go_000.png").rename(batch / "GO" / f"{forged}.png")
    (batch / "NG" / "ng_000.png").rename(batch / "NG" / "x\x1b[2Jy.txt")
    monkeypatch.chdir(repo)

    assert main(["ingest", str(batch), "--no-push"]) == 2  # the .txt is rejected

    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("accepted: passwd") for line in lines)
    (accepted,) = [line for line in lines if line.startswith("accepted: ")]
    assert accepted.startswith(f"accepted: {batch / 'GO'}/go\\naccepted: passwd -> data:GO:forged.png -> data/GO/")
    (rejected,) = [line for line in lines if line.startswith("unexpected: ")]
    assert "x\\x1b[2Jy.txt" in rejected and "\x1b" not in rejected


def test_retrain_refuses_another_params_file_before_any_run(tmp_path, monkeypatch, capsys):
    import flows.nightly

    started = []
    monkeypatch.setattr(flows.nightly, "nightly_retrain", lambda **options: started.append(options))
    other = tmp_path / "line-7.yaml"
    other.write_text("train:\n  epochs: 1\n")
    assert main(["--params", str(other), "retrain"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"fanaoi retrain: error: {other}: the dvc.yaml stages read the project's params.yaml")
    assert "pass that one" in err
    assert started == [] and sorted(path.name for path in tmp_path.iterdir()) == ["line-7.yaml"]  # no demo data


@pytest.mark.slow
@pytest.mark.integration
def test_a_failed_run_prints_its_error_once_without_the_engine_s_traceback(tmp_path):
    project = make_flow_project(tmp_path)
    (project / "data" / "NG" / "broken.png").write_text("not an image")
    env = {name: value for name, value in tool_env().items() if not name.startswith("PREFECT_")}
    retrain = subprocess.run(
        [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), "retrain", "--no-push"],
        cwd=project, env={**env, "PREFECT_HOME": str(tmp_path / "prefect-home")},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert retrain.returncode == 1
    assert "Traceback" not in retrain.stderr  # the engine logs one with the error; the dashboard keeps it
    assert retrain.stderr.count("data/NG/broken.png: not an image") >= 1
    last = [line for line in retrain.stderr.splitlines() if line.startswith("fanaoi retrain: error:")]
    assert len(last) == 1 and "broken.png" in last[0]

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tasks.data.snapshot
from tasks.data.snapshot import (
    SnapshotError,
    commit_command,
    commit_snapshot,
    data_snapshot_id,
    dvc_failure,
    snapshot_data,
)
from tests.conftest import make_image_folder
from tests.dvc_support import PROJECT, make_dvc_repo, run, tool_env


def test_snapshot_id_is_none_before_the_first_snapshot(tmp_path: Path) -> None:
    assert data_snapshot_id(tmp_path) is None


def test_snapshot_id_is_the_md5_recorded_in_data_dvc(tmp_path: Path) -> None:
    (tmp_path / "data.dvc").write_text(
        "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  nfiles: 3\n  path: data\n"
    )
    assert data_snapshot_id(tmp_path) == "0123456789abcdef0123456789abcdef.dir"


def test_a_broken_pointer_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "data.dvc").write_text("just: text\n")
    with pytest.raises(SnapshotError, match=r"data\.dvc: not a DVC pointer.*git checkout"):
        data_snapshot_id(tmp_path)


@pytest.mark.parametrize(
    ("args", "output", "expected", "transient"),
    [
        (("push", "data.dvc"),
         "ERROR: failed to push data to the cloud - config file error: no remote specified",
         r"no DVC remote; add one with `dvc remote add -d local", False),
        (("add", "--quiet", "data"), "ERROR: unexpected error - [Errno 28] No space left on device",
         r"disk full during `dvc add data`.*\.dvc/cache", True),
        (("add", "--quiet", "data"),
         "ERROR: Unable to acquire lock. Most likely another DVC process is running",
         r"another dvc command holds the repository lock", True),
        (("add", "--quiet", "data"), "ERROR: output 'data' does not exist",
         r"`dvc add data` failed: output 'data' does not", False),
        (("push", "data.dvc"),
         "ERROR: failed to push data to the cloud - [Errno 20] Not a directory: '/r/files'",
         r"`dvc push data.dvc` failed: .*Not a directory.*reachable and writable", True),
    ],
)
def test_dvc_failures_become_one_typed_line_with_the_fix(
    args: tuple[str, ...], output: str, expected: str, transient: bool
) -> None:
    error = dvc_failure(Path("/repo"), args, output)
    message = str(error)
    assert "\n" not in message
    assert message.startswith("/repo: ")
    assert re.search(expected, message)
    assert error.transient is transient
    assert error.command == "dvc " + " ".join(a for a in args if not a.startswith("-"))


def test_commit_command_records_the_pointer_file() -> None:
    assert commit_command("data", "abcdef0123.dir") == (
        "git add data.dvc && git commit -m 'Data snapshot abcdef01'"
    )


def test_a_folder_without_dvc_is_refused_with_the_fix(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data", per_class=1)
    with pytest.raises(SnapshotError, match=r"not a DVC repository.*dvc init"):
        snapshot_data(tmp_path)


@pytest.mark.integration
def test_snapshot_adds_pushes_and_reports_change(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    repo = make_dvc_repo(tmp_path / "repo", remote)
    make_image_folder(repo / "data", per_class=3)

    first = snapshot_data(repo)
    assert first["changed"] and first["pushed"]
    assert first["md5"] == data_snapshot_id(repo) and first["md5"].endswith(".dir")
    assert sum(1 for p in remote.rglob("*") if p.is_file()) == 7  # 6 images + the .dir listing

    assert snapshot_data(repo) == {"md5": first["md5"], "changed": False, "pushed": True, "skipped": False}

    assert commit_snapshot(repo, "Data snapshot") is True
    assert commit_snapshot(repo, "Data snapshot") is False  # nothing new to commit
    assert "data.dvc" in run(repo, "git", "show", "--name-only", "HEAD").stdout

    (repo / "data" / "GO" / "go_000.png").unlink()
    second = snapshot_data(repo, push=False)
    assert second["changed"] and not second["pushed"] and second["md5"] != first["md5"]


@pytest.mark.integration
def test_push_without_a_remote_names_the_fix_and_keeps_the_snapshot(tmp_path: Path) -> None:
    repo = make_dvc_repo(tmp_path / "repo", remote=None)
    make_image_folder(repo / "data", per_class=2)
    with pytest.raises(SnapshotError, match=r"no DVC remote; add one with `dvc remote add -d"):
        snapshot_data(repo)
    assert data_snapshot_id(repo) is not None  # dvc add succeeded before the push failed


@pytest.mark.integration
def test_an_unwritable_remote_is_a_transient_push_failure_that_heals(tmp_path: Path) -> None:
    # The remote's parent is a regular file, so DVC cannot create the remote (chmod would
    # not do: tests run as root). Removing the file is the operator bringing it back.
    blocker = tmp_path / "share"
    blocker.write_text("not a folder", encoding="utf-8")
    repo = make_dvc_repo(tmp_path / "repo", blocker / "remote")
    make_image_folder(repo / "data", per_class=2)

    with pytest.raises(SnapshotError) as failure:
        snapshot_data(repo)
    assert failure.value.transient is True
    assert failure.value.command == "dvc push data.dvc"
    assert str(repo) in str(failure.value) and "dvc remote list" in str(failure.value)

    blocker.unlink()
    result = snapshot_data(repo)
    assert result["pushed"] and result["md5"] == data_snapshot_id(repo)
    assert sum(1 for p in (blocker / "remote").rglob("*") if p.is_file()) == 5  # 4 images + .dir


def _rewrite(data: Path) -> None:
    image = data / "GO" / "go_000.png"
    content = bytearray(image.read_bytes())
    content[-1] ^= 1  # same size, new bytes: caught by its mtime
    image.write_bytes(bytes(content))


def _add(data: Path) -> None:
    (data / "NG" / "extra.png").write_bytes((data / "GO" / "go_001.png").read_bytes())


def _remove(data: Path) -> None:
    (data / "GO" / "go_002.png").unlink()


@pytest.mark.integration
def test_an_unchanged_folder_skips_dvc_and_any_change_defeats_the_shortcut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_dvc_repo(tmp_path / "repo", tmp_path / "remote")
    make_image_folder(repo / "data", per_class=3)
    calls: list[str] = []
    real_run_dvc = tasks.data.snapshot.run_dvc

    def counted(repo_dir: Path | str, *args: str) -> str:
        calls.append(args[0])
        return real_run_dvc(repo_dir, *args)

    monkeypatch.setattr(tasks.data.snapshot, "run_dvc", counted)
    first = snapshot_data(repo, stamp_dir=".fanaoi")
    assert calls == ["add", "push"] and not first["skipped"]

    calls.clear()
    again = snapshot_data(repo, stamp_dir=".fanaoi")
    assert calls == [] and again == {**first, "changed": False, "skipped": True}

    md5 = first["md5"]
    for change in (_rewrite, _add, _remove):
        change(repo / "data")
        calls.clear()
        result = snapshot_data(repo, push=False, stamp_dir=".fanaoi")
        assert calls == ["add"] and not result["skipped"], change.__name__
        assert result["md5"] not in (md5, None) and result["md5"] == data_snapshot_id(repo)
        md5 = result["md5"]

    calls.clear()  # added but never pushed: the push still runs, the add does not
    assert snapshot_data(repo, stamp_dir=".fanaoi")["skipped"] and calls == ["push"]
    calls.clear()
    assert snapshot_data(repo, stamp_dir=".fanaoi")["skipped"] and calls == []
    monkeypatch.chdir(repo)  # the CLI names the repo ".", the flow by its absolute path
    assert snapshot_data(Path("."), stamp_dir=".fanaoi")["skipped"] and calls == []


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for a reaper has stopped running)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.mark.integration
@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["term", "int", "kill"])
def test_killing_an_ingest_kills_its_dvc_child(tmp_path: Path, kill: signal.Signals) -> None:
    repo = make_dvc_repo(tmp_path / "repo", remote=None)
    (repo / "params.yaml").write_text("validate:\n  min_per_class: 1\n")
    batch = make_image_folder(tmp_path / "batch", per_class=1)
    # A `python -m dvc` that hangs, as a huge push does: first on the path, ahead of the real one.
    fake = tmp_path / "fake" / "dvc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    pid_file = tmp_path / "dvc.pid"
    (fake / "__main__.py").write_text(
        f"import os, pathlib, time\npathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\ntime.sleep(300)\n"
    )
    env = {**tool_env(), "PYTHONPATH": os.pathsep.join([str(fake.parent), str(PROJECT)])}
    # A shell starting a background job without job control (CI, nohup ... &) makes it ignore
    # SIGINT, and children inherit that: the ingest gets Ctrl-C's default, as at a terminal.
    ingest = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ingest", str(batch), "--no-push"],
        cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - one syscall, no lock
    )
    try:
        deadline = time.monotonic() + 120
        while not pid_file.is_file() or not pid_file.read_text():
            assert ingest.poll() is None and time.monotonic() < deadline, "the ingest never started dvc"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        ingest.send_signal(kill)
        ingest.wait(timeout=30)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), f"dvc child {child} outlived the ingest killed with {kill.name}"
    finally:
        ingest.kill()
        if pid_file.is_file() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)

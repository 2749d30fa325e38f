"""The project lock: one holder at a time across processes; a waiter learns who holds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from flows.cli import main
from tasks.project_lock import LOCK_FILE, ProjectLocked, project_lock, project_root
from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[2]


def hold_lock(project: Path, seconds: float, what: str = "fanaoi ingest nightly-batch/") -> subprocess.Popen:
    """Another process, ``what``, holding the project lock for ``seconds`` (it prints once it holds it)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from tasks.project_lock import project_lock
            with project_lock({str(project)!r}, {what!r}, timeout=5):
                print("held", flush=True)
                time.sleep({seconds})
        """)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_caller_fails_after_the_timeout_naming_the_holder(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path, 60)
    try:
        started = time.monotonic()
        with pytest.raises(ProjectLocked) as failure, project_lock(tmp_path, "fanaoi train", 0.5):
            pass
        assert time.monotonic() - started >= 0.5
        message = str(failure.value)
        assert f"pid {holder.pid} on " in message and "(fanaoi ingest nightly-batch/, since " in message
        assert "fanaoi train waited 0.5 s (lock.timeout in params.yaml)" in message
        assert failure.value.transient is True
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a holder that dies frees the lock at once
        holder.wait()
    with project_lock(tmp_path, "fanaoi train", 1):
        pass


def test_a_second_caller_waits_for_the_holder_to_finish(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path, 1.0)
    try:
        started = time.monotonic()
        with project_lock(tmp_path, "fanaoi validate", 30):
            waited = time.monotonic() - started
        assert waited > 0.7  # the holder kept it for 1 s after saying so
    finally:
        holder.wait()


def test_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    inside = threading.Event()
    release = threading.Event()

    def first() -> None:
        with project_lock(tmp_path, "nightly_retrain run", 5):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(10)
        with pytest.raises(ProjectLocked, match=f"pid {os.getpid()} .*nightly_retrain run"):
            with project_lock(tmp_path, "ingest-batch flow", 0.2):
                pass
    finally:
        release.set()
        thread.join()


def test_fanaoi_ingest_waits_then_fails_naming_the_holder(tmp_path: Path, monkeypatch, capsys) -> None:
    project = tmp_path / "project"
    make_image_folder(project / "data", per_class=1)
    (project / ".dvc").mkdir()
    monkeypatch.chdir(project)
    params = project / "params.yaml"
    params.write_text("lock:\n  timeout: 0.3\n")
    batch = make_image_folder(tmp_path / "batch", per_class=1, seed=3)
    before = sorted(p.name for p in (project / "data").rglob("*"))
    holder = hold_lock(project, 60)
    try:
        assert main(["--params", str(params), "ingest", str(batch), "--no-push"]) == 1
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.startswith(f"fanaoi ingest: error: {project / '.fanaoi' / 'project.lock'}: pid {holder.pid} ")
    assert "(fanaoi ingest nightly-batch/, since" in err and "waited 0.3 s" in err
    assert sorted(p.name for p in (project / "data").rglob("*")) == before


def test_the_project_is_the_nearest_folder_up_holding_dvc_yaml(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "data" / "GO").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    assert project_root(project / "data" / "GO") == project
    assert project_root(project) == project
    assert project_root(tmp_path) == tmp_path  # no dvc.yaml above: the folder itself


def test_params_from_another_folder_do_not_bypass_the_project_lock(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """`fanaoi validate & fanaoi --params ../elsewhere/x.yaml ingest batch/` (issue 28)."""
    project = tmp_path / "project"
    make_image_folder(project / "data", per_class=1)
    (project / "dvc.yaml").write_text("stages: {}\n")
    elsewhere = tmp_path / "elsewhere" / "x.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("lock:\n  timeout: 0.3\n")
    batch = make_image_folder(tmp_path / "batch", per_class=1, seed=3)
    before = sorted(p.name for p in (project / "data").rglob("*"))
    monkeypatch.chdir(project)
    holder = hold_lock(project, 60, what="fanaoi validate")
    try:
        started = time.monotonic()
        assert main(["--params", "../elsewhere/x.yaml", "ingest", str(batch), "--no-push"]) == 1
        assert time.monotonic() - started >= 0.3
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.startswith(f"fanaoi ingest: error: {project / LOCK_FILE}: pid {holder.pid} ")
    assert "(fanaoi validate, since" in err and "waited 0.3 s" in err
    assert sorted(p.name for p in (project / "data").rglob("*")) == before
    assert not (elsewhere.parent / LOCK_FILE).exists()

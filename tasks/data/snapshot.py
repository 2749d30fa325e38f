"""Snapshots of the data folder with DVC.

``dvc add data`` records the folder's content hash in ``data.dvc`` (the snapshot id every
model card cites), ``dvc push`` copies the files to the DVC remote, and ``dvc checkout``
of an older ``data.dvc`` brings that exact folder back.

DVC is driven through its command line (``python -m dvc`` of this interpreter, so the
DVC next to FanAOI is used whatever PATH says). The CLI is DVC's supported interface, its
``Repo`` class is not; each call releases DVC's lock when its process ends; and the
in-process API saved well under a second per call on a 2,000-image folder.

Each of those commands costs seconds (a Python process importing DVC, then a walk that
hashes or checks every file), every night, even when nothing changed. A stamp written
after a successful ``dvc add`` (and ``dvc push``) records every file's (path, size,
mtime, inode), the bytes of ``data.dvc`` and the remote settings; while all of them are
unchanged the commands are skipped. It is the key DVC's own state database trusts
to skip re-hashing a file.

The stamp also records the modification time of the data folder and of each folder below
it: adding, removing or renaming a file changes its folder's time, so ``fanaoi status``
tells whether data/ still holds the snapshot with a few stats, whatever the number of
images (see :func:`changed_folders`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.child_process import child_command, child_env
from tasks.durable import add_file_stats, cache_file, read_json, write_json
from tasks.errors import FanaoiError

DEFAULT_REMOTE_HINT = "dvc remote add -d local ~/.cache/fanaoi/dvc-remote"


# DVC commands that talk to the remote: their failures are mostly the network or the
# remote's storage (unreachable, timed out, full), which may be back on the next attempt.
REMOTE_COMMANDS = ("push", "pull", "fetch")


class SnapshotError(FanaoiError):
    """DVC could not record or push the data snapshot; the message says what to fix.

    ``command`` is what failed (``dvc push data.dvc``, ``git commit``), ``transient``
    whether a retry may pass (see :func:`dvc_failure`).
    """

    def __init__(self, message: str, *, command: str | None = None, transient: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.command = command


def pointer_file(repo_dir: Path | str, data_dir: str = "data") -> Path:
    """The DVC pointer of ``data_dir``: ``data.dvc`` beside the folder."""
    return Path(repo_dir) / f"{data_dir}.dvc"


def data_snapshot_id(repo_dir: Path | str, data_dir: str = "data") -> str | None:
    """The md5 DVC recorded for ``data_dir`` (``<hash>.dir``), or None before the first snapshot."""
    pointer = pointer_file(repo_dir, data_dir)
    if not pointer.is_file():
        return None
    try:
        return str(yaml.safe_load(pointer.read_text(encoding="utf-8"))["outs"][0]["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise SnapshotError(
            f"{pointer}: not a DVC pointer file (no outs[0].md5); restore it with "
            f"`git checkout -- {pointer.name}` or recreate it with `dvc add {data_dir}`"
        ) from None


def snapshot_data(
    repo_dir: Path | str, data_dir: str = "data", push: bool = True,
    stamp_dir: Path | str | None = None,
) -> dict:
    """``dvc add`` the data folder, then ``dvc push`` it; returns md5, changed, pushed, skipped.

    With ``stamp_dir`` (relative to ``repo_dir``), a folder whose files, pointer and
    remote settings are those of the last snapshot (see the module docstring) skips
    ``dvc add`` (``skipped``), and skips ``dvc push`` too when that snapshot was pushed.
    """
    repo_dir = Path(repo_dir)
    require_dvc_repo(repo_dir)
    if not (repo_dir / data_dir).is_dir():
        raise SnapshotError(
            f"{repo_dir / data_dir}: data folder not found; create it (one subfolder per class) "
            f"or restore the last snapshot with `dvc checkout {data_dir}.dvc`"
        )
    stamp_path = (
        cache_file(repo_dir / stamp_dir, repo_dir / data_dir, "snapshot") if stamp_dir is not None else None
    )
    stamp = read_json(stamp_path) if stamp_path else {}
    files = _files_digest(repo_dir / data_dir) if stamp_path else None
    folders = _folder_times(repo_dir / data_dir) if stamp_path else {}
    before = data_snapshot_id(repo_dir, data_dir)
    skipped = files is not None and stamp.get("state") == _state(repo_dir, data_dir, files)
    if not skipped:
        # No relink: the files in data/ are already the bytes just hashed. Checking each
        # against its cache copy again cost dvc add a third of its time at 100,000 files.
        run_dvc(repo_dir, "add", "--no-relink", data_dir)
        # A file changed while dvc add ran may be in data/ but not in data.dvc: no stamp.
        if files is not None and _files_digest(repo_dir / data_dir) != files:
            files = None
        _write_stamp(stamp_path, repo_dir, data_dir, files, folders=folders, pushed=False)
    after = data_snapshot_id(repo_dir, data_dir)
    if push and not (skipped and stamp.get("pushed")):
        run_dvc(repo_dir, "push", pointer_file(repo_dir, data_dir).name)
        _write_stamp(stamp_path, repo_dir, data_dir, files, folders=folders, pushed=True)
    return {"md5": after, "changed": after != before, "pushed": push, "skipped": skipped}


def _files_digest(folder: Path) -> str:
    """A digest of every file's (path, size, mtime, inode) under ``folder``."""
    digest = hashlib.sha256()
    add_file_stats(digest, folder, "")
    return digest.hexdigest()


def _folder_times(folder: Path) -> dict[str, int]:
    """The modification time (ns) of ``folder`` and of every folder below it, by relative path."""
    return {os.path.relpath(root, folder): os.stat(root).st_mtime_ns for root, _dirs, _files in os.walk(folder)}


def changed_folders(repo_dir: Path, data_dir: str, stamp_dir: str, md5: str) -> list[str] | None:
    """The folders of ``data_dir`` whose files changed since snapshot ``md5`` was recorded ([]: none).

    One stat per folder of the stamp, not per file: a file added, removed or renamed changes
    its folder's time (one rewritten in place under its old name does not; DVC sees it). None
    when the stamp is not of that snapshot: none written yet, or the snapshot was made by a
    plain ``dvc add``.
    """
    folder = repo_dir / data_dir
    stamp = read_json(cache_file(repo_dir / stamp_dir, folder, "snapshot"))
    recorded = stamp.get("folders")
    if stamp.get("md5") != md5 or not isinstance(recorded, dict):
        return None
    changed = []
    for relative, mtime in recorded.items():
        try:
            now = os.stat(folder / relative).st_mtime_ns
        except OSError:
            now = None
        if now != mtime:
            changed.append(os.path.normpath(os.path.join(data_dir, relative)))
    return changed


def _state(repo_dir: Path, data_dir: str, files: str) -> str:
    """The files' digest with the pointer's bytes and the DVC config (where a push goes)."""
    digest = hashlib.sha256(files.encode())
    for extra in (pointer_file(repo_dir, data_dir), repo_dir / ".dvc" / "config",
                  repo_dir / ".dvc" / "config.local"):
        digest.update(f"\0{extra.name}\0".encode())
        digest.update(extra.read_bytes() if extra.is_file() else b"(none)")
    return digest.hexdigest()


def _write_stamp(
    path: Path | None, repo_dir: Path, data_dir: str, files: str | None, *, folders: dict[str, int], pushed: bool,
) -> None:
    """Record the snapshot just made (or pushed); with no trustworthy digest, forget it."""
    if path is None:
        return
    if files is None:
        path.unlink(missing_ok=True)
        return
    write_json(path, {
        "state": _state(repo_dir, data_dir, files), "pushed": pushed,
        "md5": data_snapshot_id(repo_dir, data_dir), "folders": folders,
    }, indent=None)


def commit_command(data_dir: str = "data", md5: str | None = None) -> str:
    """The git command that records the snapshot, for the user to run."""
    return f"git add {data_dir}.dvc && git commit -m {shlex.quote(commit_message(md5))}"


def commit_message(md5: str | None, detail: str = "") -> str:
    short = (md5 or "none")[:8]
    return f"Data snapshot {short}" + (f": {detail}" if detail else "")


def commit_snapshot(repo_dir: Path | str, message: str, data_dir: str = "data") -> bool:
    """Commit ``data.dvc`` alone (other staged changes stay staged); False if unchanged."""
    repo_dir = Path(repo_dir)
    name = pointer_file(repo_dir, data_dir).name
    if not _git(repo_dir, "status", "--porcelain", "--", name).strip():
        return False
    _git(repo_dir, "add", "--", name)
    _git(repo_dir, "commit", "--quiet", "-m", message, "--", name)
    return True


def require_dvc_repo(repo_dir: Path) -> None:
    if not (repo_dir / ".dvc").is_dir():
        raise SnapshotError(
            f"{repo_dir}: not a DVC repository (no .dvc folder); run `git init && dvc init` "
            f"there, then `{DEFAULT_REMOTE_HINT}`"
        )


def run_dvc(repo_dir: Path | str, *args: str) -> str:
    """One dvc command in ``repo_dir``; a failure raises SnapshotError with the fix.

    DVC runs in a child that dies with this process (tasks.child_process): a killed ingest
    or snapshot leaves no ``dvc add`` or ``dvc push`` running behind it.
    """
    if importlib.util.find_spec("dvc") is None:
        raise SnapshotError(
            f"dvc is not installed for {sys.executable}; run `make venv` "
            f"(installs requirements.lock) or `pip install 'dvc>=3.60,<4'`"
        )
    result = subprocess.run(
        child_command("dvc", *args),
        cwd=repo_dir, env=child_env(DVC_NO_ANALYTICS="1"), capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise dvc_failure(Path(repo_dir), args, result.stderr + result.stdout)
    return result.stdout


def dvc_failure(repo_dir: Path, args: tuple[str, ...], output: str) -> SnapshotError:
    """DVC's error output as one line that names what to fix, typed transient or not.

    Transient: a busy repository lock, a full disk, and any failure of a command that
    talks to the remote other than a missing or broken remote configuration (an
    unreachable or unwritable remote may be back on the next attempt). Permanent: the
    rest (no DVC repository, a missing output, a bad dvc.yaml).
    """
    command = "dvc " + " ".join(a for a in args if not a.startswith("-"))
    errors = re.findall(r"ERROR: (.*)", output)
    lines = output.strip().splitlines()
    reason = " ".join(errors) if errors else (lines[-1] if lines else "no output, see `dvc doctor`")

    # (markers in DVC's output, what to say, transient), the first match wins
    known = (
        (("no remote specified",),
         f"`{command}` found no DVC remote; add one with `{DEFAULT_REMOTE_HINT}` "
         f"(S3/GCS/Azure: see README, Data versioning) or skip the push with --no-push", False),
        (("config file error",),
         f"`{command}` failed: {reason}; fix the remote's settings (`dvc remote list`, "
         f".dvc/config)", False),
        (("No space left on device", "Errno 28"),
         f"disk full during `{command}`; free space on the disk holding the DVC cache "
         f"({repo_dir / '.dvc' / 'cache'}) or the remote (`dvc remote list`), then rerun", True),
        (("Unable to acquire lock",),
         f"another dvc command holds the repository lock during `{command}`; wait for it, "
         f"then rerun", True),
        (("not inside of a DVC repository",), "not a DVC repository; run `dvc init` there", False),
    )
    for markers, message, transient in known:
        if any(marker in output for marker in markers):
            return SnapshotError(f"{repo_dir}: {message}", command=command, transient=transient)
    if args and args[0] in REMOTE_COMMANDS:
        return SnapshotError(
            f"{repo_dir}: `{command}` failed: {reason}; check that the DVC remote "
            f"(`dvc remote list`) is reachable and writable, then rerun",
            command=command, transient=True,
        )
    return SnapshotError(f"{repo_dir}: `{command}` failed: {reason}", command=command)


def _git(repo_dir: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=repo_dir, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = result.stderr.strip() or result.stdout.strip()
        command = f"git {' '.join(args)}"
        raise SnapshotError(f"{repo_dir}: `{command}` failed: {reason}", command=command)
    return result.stdout

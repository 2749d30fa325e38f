"""A throwaway PostgreSQL cluster for tests: initdb in a temp folder, pg_ctl on a free port.

The operator's recipe (README, Operating FanAOI) in miniature. PostgreSQL refuses to run
as root, so as root the cluster belongs to the ``postgres`` user of the Debian package.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.prefect_support import free_port

BINARIES = ("initdb", "pg_ctl", "postgres", "createdb")


def postgres_bin() -> tuple[Path | None, str]:
    """The folder holding initdb, pg_ctl and postgres, or None and why not."""
    folders = [Path(p).parent for p in [shutil.which("pg_ctl")] if p]
    folders += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in folders:
        if all((folder / name).is_file() for name in BINARIES):
            return folder, ""
    return None, ("no PostgreSQL binaries (initdb, pg_ctl, postgres, createdb) on PATH or in "
                  "/usr/lib/postgresql/*/bin; .ci/run installs the Debian package postgresql")


class Postgres:
    """A cluster in its own folder; :meth:`stop` stops it and removes the folder."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="fanaoi-pg-"))  # not under pytest's 0700 tmp
        self.data = self.root / "data"
        self.port = free_port()
        self.owner = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            account = pwd.getpwnam(self.owner)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self.url = f"postgresql+asyncpg://{self.owner}@127.0.0.1:{self.port}/prefect"

    def _run(self, *command: str) -> None:
        as_owner = ["setpriv", "--reuid", self.owner, "--regid", self.owner, "--init-groups"] \
            if os.geteuid() == 0 else []
        result = subprocess.run([*as_owner, *command], capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")

    def start(self) -> None:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", self.owner, "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgres.log"),
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "-w", "start")
        self._run(str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.owner,
                  "prefect")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

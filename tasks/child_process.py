"""Python child processes that die with the FanAOI process that started them.

``python -m tasks.child_process PARENT_PID MODULE ARG...`` runs ``MODULE`` as ``python -m
MODULE ARG...`` would, after asking Linux to SIGKILL it when its parent dies
(PR_SET_PDEATHSIG). A killed ingest then leaves no ``dvc add`` or ``dvc push`` behind, and
a killed publish no TensorFlow process: no handler in the parent could clean up after a
SIGKILL, and a SIGTERM ends Python without running ``finally`` blocks.

Linux sends the signal when the *thread* that started the child ends; every caller here
waits for its child in that same thread.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def child_command(module: str, *args: str) -> list[str]:
    """The argv that runs ``python -m module args`` in a child that dies with this process."""
    return [sys.executable, "-m", __name__, str(os.getpid()), module, *args]


def child_env(**extra: str) -> dict[str, str]:
    """This environment with ``extra``, and FanAOI importable whatever the child's folder."""
    python_path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **extra, "PYTHONPATH": python_path}


def main(argv: Sequence[str]) -> None:
    parent, module, *args = argv
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died before prctl: then no signal will ever come.
    if os.getppid() != int(parent):
        sys.exit("the FanAOI process that started this one is gone")
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])

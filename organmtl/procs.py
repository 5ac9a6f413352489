"""Running stock commands (nnUNetv2_train, nnUNetv2_predict, train_net.py) as subprocesses in
their own process group, so a failure or Ctrl-C also stops their data-augmentation workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class CommandFailed(RuntimeError):
    pass


class CommandStopped(CommandFailed):
    """Killed because ``run_in_group``'s ``stop`` event was set (another command failed)."""


def venv_bin(name: str) -> str:
    """Path of a console script installed beside the running interpreter (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_in_group(cmd: list[str], env: dict | None = None, log_file: Path | None = None,
                 timeout: float | None = None, cwd: Path | None = None, stop=None) -> None:
    """Run ``cmd`` in a new session; on error, timeout or interrupt kill its whole process group.

    Output goes to ``log_file`` (appended) or is inherited. Raises :class:`CommandFailed` with the
    log's last lines when the command exits non-zero. ``stop`` (a ``threading.Event``) set by
    another thread kills the group too (commands run from worker threads, which get no Ctrl-C).
    """
    full_env = {**os.environ, **(env or {})}
    out = open(log_file, "a") if log_file else None
    proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT if out else None,
                            start_new_session=True, cwd=cwd)
    try:
        rc = proc.wait(timeout=timeout) if stop is None else _wait_unless_stopped(proc, timeout, stop)
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if out:
            out.close()
    _kill_group(proc)  # leftover workers of a finished command
    if rc != 0:
        tail = ""
        if log_file and Path(log_file).exists():
            tail = "\n".join(Path(log_file).read_text(errors="replace").splitlines()[-15:])
        raise CommandFailed(f"{' '.join(map(str, cmd[:3]))} ... exited with {rc}\n{tail}")


def _wait_unless_stopped(proc: subprocess.Popen, timeout: float | None, stop) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if stop.is_set():
                raise CommandStopped(f"{' '.join(map(str, proc.args[:3]))} ... stopped (another command failed)")
            if deadline is not None and time.monotonic() > deadline:
                raise


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass

"""Background processes controlled by a pid file: start one, tell whether the pid in the file is really that
process, stop it (SIGTERM, then SIGKILL), and show the end of its log when it fails. Used for TorchServe (whose
launcher writes the pid file itself) and for the router.

A pid file can outlive its process and the pid be reused, so a pid counts only while its process is alive, not
a zombie, and its command line is the one we started (`owns`: for TorchServe, its own run directory's config).
Not by comparing the process's start time with the file's: psutil derives a start time from the boot time as the
wall clock sees it now, so a step of the machine's clock (these VMs have them) makes a live process look younger
than its pid file, and it would be left running, unstoppable.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

# Processes this process launched, by pid: their Popen objects reap them (and keep their exit status), and are
# kept so that they are not collected while the child runs.
_launched: dict[int, subprocess.Popen[bytes]] = {}


class PidFile:
    def __init__(self, path: Path, owns: Callable[[list[str]], bool], name: str = "process") -> None:
        self.path = path
        self.owns = owns  # does this command line belong to the process we start?
        self.name = name

    def process(self) -> psutil.Process | None:
        """The live process the pid file names, if it is ours; else None."""
        try:
            process = psutil.Process(int(self.path.read_text().strip()))
            if process.status() == psutil.STATUS_ZOMBIE:
                return None  # gone, not yet reaped
            return process if self.owns(process.cmdline()) else None  # else: the pid was reused
        except (FileNotFoundError, ValueError, psutil.Error):
            return None

    def pid(self) -> int | None:
        process = self.process()
        return None if process is None else process.pid

    def launch(self, command: Sequence[str], log_file: Path, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `command` in its own session, its output appended to `log_file`, and record its pid."""
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as output:
            process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        _launched[process.pid] = process
        self.path.write_text(f"{process.pid}\n")
        return process

    def stop(self, timeout_s: float = 20.0, kill_timeout_s: float = 10.0) -> int | None:
        """SIGTERM our process (SIGKILL if it is still there after `timeout_s`), then any of its children that
        outlive it; remove the pid file. The pid stopped, or None if none of ours was running."""
        process = self.process()
        if process is None:
            return None
        try:
            children = process.children(recursive=True)
            process.terminate()  # psutil refuses to signal a pid that now names another process
        except psutil.NoSuchProcess:
            children = []
        if _wait_gone([process], timeout_s):
            log.warning("%s (pid %d) did not stop within %g s of SIGTERM: SIGKILL", self.name, process.pid, timeout_s)
            _kill([process])
            _wait_gone([process], kill_timeout_s)
        alive = _wait_gone(children, kill_timeout_s)
        if alive:  # orphans of a killed parent
            _kill(alive)
            _wait_gone(alive, kill_timeout_s)
        self.path.unlink(missing_ok=True)
        log.info("stopped %s (pid %d)", self.name, process.pid)
        return process.pid


def _gone(process: psutil.Process) -> bool:
    """Whether a process has exited; reaps it if it is our child. A zombie counts as gone: whoever is its
    parent reaps it, not us."""
    launched = _launched.get(process.pid)
    if launched is not None:
        if launched.poll() is None:
            return False
        del _launched[process.pid]
        return True
    try:
        process.wait(0)
        return True
    except psutil.TimeoutExpired:
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to `timeout_s` for the processes to exit; those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = [process for process in processes if not _gone(process)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [process for process in alive if not _gone(process)]
    return alive


def _kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} not written)"

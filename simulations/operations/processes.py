"""The processes of a loopback deployment: free ports, each started in a process group of its
own and marked by an environment variable, waited for with a deadline, and stopped by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

# Every process a deployment starts inherits this variable (with the deployment's own value), so
# shutdown also finds processes that left the process group, e.g. the SuperExec the SuperLink
# starts in a new session, and the ServerApp processes under it.
MARKER_ENV = "NEXTQUILL_DEPLOYMENT_ID"


class DeploymentError(RuntimeError):
    """A deployment process failed to start, or a run failed or timed out; the message carries
    the last lines of the relevant logs."""


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now. The sockets are held together so the ports differ; another
    program could still take one before our server binds it, a window accepted here."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def start_process(command: list[str], *, env: dict[str, str], cwd: Path | None, log: Path) -> subprocess.Popen[bytes]:
    """Start `command` from the venv's bin, output to `log`, in a process group of its own so that
    its children (SuperExec, ClientApps) can be signalled together."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if cwd is not None:
        cwd.mkdir(parents=True, exist_ok=True)
    executable = str(Path(sys.executable).parent / command[0])
    with open(log, "wb") as out:
        return subprocess.Popen(
            [executable, *command[1:]],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def stop_processes(processes: list[subprocess.Popen[bytes]], marker: str, timeout: float) -> None:
    """SIGTERM to each started process's group and to every other process carrying the
    deployment's marker, SIGKILL to whatever is left after `timeout` seconds; all by pid."""
    groups = [process.pid for process in processes]
    for pgid in reversed(groups):  # SuperNodes first, so they leave while the SuperLink is up
        signal_group(pgid, signal.SIGTERM)
    # Those outside our groups: the SuperExec the SuperLink starts in a session of its own, and the
    # ServerApps under it. Each process gets one SIGTERM only: a second one cuts Flower's cleanup short.
    outside = [proc for proc in marked_processes(marker) if _pgid(proc) not in groups]
    for proc in outside:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    psutil.wait_procs(outside, timeout=max(0.0, deadline - time.monotonic()))
    # Whatever is still there, including processes started while we were stopping (a SuperExec
    # launching one more app), is killed.
    for pgid in groups:
        signal_group(pgid, signal.SIGKILL)
    leftovers = marked_processes(marker)
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(leftovers, timeout=timeout)


def signal_group(pgid: int, signum: signal.Signals) -> None:
    # Linux never hands out a pid that is still in use as a process-group id, so while any member
    # of the group lives, this reaches only processes we started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except ProcessLookupError:
        return None


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries `marker`: everything the deployment started,
    however deep, except processes that cleared their environment (none of Flower's do)."""
    return [
        proc
        for proc in psutil.process_iter(["environ", "status"], ad_value=None)
        if (proc.info["environ"] or {}).get(MARKER_ENV) == marker and proc.info["status"] != psutil.STATUS_ZOMBIE
    ]


def wait_for(
    ready: Callable[[], bool],
    deadline: float,
    started: Mapping[str, subprocess.Popen[bytes]],
    logs: Mapping[str, Path],
    what: str,
) -> None:
    """Poll `ready()` until it is true; fail early, with its log, if a started process exits."""
    while not ready():
        for name, process in started.items():
            if process.poll() is not None:
                raise DeploymentError(f"{name} exited with code {process.returncode}{tail(logs[name])}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"timed out waiting for {what}" + "".join(tail(log) for log in logs.values()))
        time.sleep(0.5)


def tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return f"\n--- {log}: not readable"
    return f"\n--- last lines of {log}:\n" + "\n".join(text)

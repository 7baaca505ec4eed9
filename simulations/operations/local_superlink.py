"""The local SuperLink that `flwr run .` starts and leaves running: find it, and stop exactly it.

`flwr run` (Flower 1.41, `flwr/cli/local_superlink.py`) starts `flower-superlink --insecure
--simulation ... --port <FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, 39091> --log-file
<FLWR_HOME>/local-superlink/superlink.log` detached, and records no process id. This module
finds it the only way that names one process: the process listening on that port on
127.0.0.1, accepted only when its command line is that SuperLink's (its program, `--simulation`
and that log file). It is stopped by its id, with the simulation processes it had started
for a run in flight; a pattern never chooses what ends.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import psutil

STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL after this long


@dataclass(frozen=True)
class LocalSuperLink:
    pid: int
    address: str
    log_file: Path
    command: tuple[str, ...]
    working_dir: Path | None  # the simulations it runs import from here first (Ray puts it on their path)

    def describe(self) -> str:
        return (f"process {self.pid} on {self.address}, log {self.log_file}, working directory "
                f"{self.working_dir or 'unknown'}")


def expected_address() -> tuple[str, int]:
    """Where `flwr run` puts its local SuperLink (Flower reads the port from the environment)."""
    from flwr.cli.constant import LOCAL_SUPERLINK_HTTP_API_PORT

    return "127.0.0.1", int(LOCAL_SUPERLINK_HTTP_API_PORT)


def expected_log_file() -> Path:
    from flwr.supercore.utils import get_flwr_home

    return Path(get_flwr_home()) / "local-superlink" / "superlink.log"


def _is_flwr_local_superlink(command: list[str], log_file: Path) -> bool:
    program = any(Path(part).name == "flower-superlink" for part in command[:2])
    logs_there = any(a == "--log-file" and Path(b) == log_file for a, b in zip(command, command[1:], strict=False))
    return program and "--simulation" in command and logs_there


def find_local_superlink() -> LocalSuperLink | None:
    """The local SuperLink of `flwr run`, or None when nothing listens on its address.

    Raises ValueError when another program holds the address: it is named, never stopped."""
    host, port = expected_address()
    log_file = expected_log_file()
    listeners = {c.pid for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                 and c.laddr.ip in (host, "0.0.0.0", "::")}
    if not listeners:
        return None
    if None in listeners:
        raise ValueError(f"{host}:{port} is held by a process of another user; nothing was stopped")
    found = []
    for pid in sorted(listeners):
        try:
            process = psutil.Process(pid)
            command = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            raise ValueError(f"{host}:{port} is held by process {pid}, which this user cannot inspect; "
                             "nothing was stopped") from None
        working_dir = None
        with contextlib.suppress(psutil.Error):
            working_dir = Path(process.cwd())
        if not _is_flwr_local_superlink(command, log_file):
            raise ValueError(f"{host}:{port} is held by process {pid} ({' '.join(command)[:200]}), which is not "
                             f"the local SuperLink of `flwr run` (FLWR_HOME {log_file.parent.parent}); "
                             "nothing was stopped")
        found.append(LocalSuperLink(pid, f"{host}:{port}", log_file, tuple(command), working_dir))
    return found[0] if found else None


def stop_local_superlink(timeout_s: float = STOP_TIMEOUT_S) -> LocalSuperLink | None:
    """Stop the local SuperLink (SIGTERM; SIGKILL after `timeout_s`) and then the processes it
    had started that are still running (a simulation in flight). Returns what was stopped,
    or None when none was running."""
    superlink = find_local_superlink()
    if superlink is None:
        return None
    process = psutil.Process(superlink.pid)
    started = process.children(recursive=True)
    for processes in ([process], started):
        running = [p for p in processes if p.is_running()]  # is_running also refuses a reused pid
        for p in running:
            _signal(p, terminate=True)
        _, alive = psutil.wait_procs(running, timeout=timeout_s)
        for p in alive:
            _signal(p, terminate=False)
        _, alive = psutil.wait_procs(alive, timeout=timeout_s)
        if alive:
            raise ValueError(f"process {alive[0].pid} did not end after SIGKILL: {superlink.describe()}")
    return superlink


def _signal(process: psutil.Process, terminate: bool) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        process.terminate() if terminate else process.kill()


def superlink_command(action: str) -> int:
    """`nextquill local-superlink status|stop`."""
    host, port = expected_address()
    if action == "status":
        superlink = find_local_superlink()
        print(f"running: {superlink.describe()}" if superlink
              else f"no local SuperLink on {host}:{port} (FLWR_HOME {expected_log_file().parent.parent})")
        if superlink and superlink.working_dir and superlink.working_dir != Path.cwd():
            print(f"note: it was started from {superlink.working_dir}, not here: the simulations it runs import "
                  "that folder's modules first; stop it before running from another checkout")
        return 0
    superlink = stop_local_superlink()
    print(f"stopped the local SuperLink: {superlink.describe()}" if superlink
          else f"no local SuperLink on {host}:{port}: nothing to stop")
    return 0


"""`nextquill local-superlink stop` ends exactly the SuperLink that `flwr run` started, by its id.

The SuperLink here is started by Flower's own code (`flwr.cli.local_superlink`, what `flwr run .`
calls), in a Flower home and on ports of the test's own, so the user's SuperLink is never met."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from simulations.operations.processes import free_ports

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def flwr_env(tmp_path):
    port, control_port = free_ports(2)
    return {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port), "FLWR_DISABLE_UPDATE_CHECK": "1",
            # flwr runs `flower-superlink` from PATH: this environment's, activated or not
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def nextquill(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", "local-superlink", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def listener(port: int) -> int | None:
    return next((c.pid for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port), None)


def test_stop_ends_the_superlink_flwr_run_started_and_nothing_that_only_looks_like_it(flwr_env):
    port = int(flwr_env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
    # A process whose command line matches what `pkill -f "flower-superlink --simulation"` would end.
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "flower-superlink", "--simulation"])
    try:
        started = subprocess.run(
            [sys.executable, "-c", "from flwr.cli.local_superlink import _start_local_superlink as s; s()"],
            env=flwr_env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        superlink = listener(port)
        assert superlink is not None

        status = nextquill(flwr_env, "status")
        assert status.returncode == 0 and f"running: process {superlink} on 127.0.0.1:{port}" in status.stdout
        assert "working directory" in status.stdout

        stopped = nextquill(flwr_env, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped the local SuperLink: process {superlink} on 127.0.0.1:{port}" in stopped.stdout
        assert not psutil.pid_exists(superlink) or psutil.Process(superlink).status() == psutil.STATUS_ZOMBIE
        assert listener(port) is None
        assert decoy.poll() is None  # untouched

        again = nextquill(flwr_env, "stop")
        assert again.returncode == 0 and "nothing to stop" in again.stdout
    finally:
        decoy.kill()
        decoy.wait()


def test_a_port_held_by_another_program_is_named_and_left_running(flwr_env):
    port = int(flwr_env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
    other = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while listener(port) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped = nextquill(flwr_env, "stop")
        assert stopped.returncode == 2
        assert f"127.0.0.1:{port} is held by process {other.pid}" in stopped.stderr
        assert "not the local SuperLink of `flwr run`" in stopped.stderr and "nothing was stopped" in stopped.stderr
        assert "Traceback" not in stopped.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()

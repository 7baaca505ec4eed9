"""A Ray cluster on loopback, for Flower's simulation to attach to: a head and worker nodes,
each started by `ray start` as a process of its own (the way each machine of a real cluster
starts its node), every one of them and every server they open bound to 127.0.0.1.

Ray 2.55 does not keep a cluster on the loopback of a machine that has another network:
`ray start --node-ip-address=127.0.0.1` and `--address=127.0.0.1:<port>` are rewritten to the
machine's outward address (`ray._private.services.resolve_ip_for_localhost`), and its servers
then listen on every interface. So the cluster runs in a network namespace of its own
(`unshare --user --map-root-user --net --uts`, no privileges needed) whose only interface is
the loopback and whose host name is `localhost`: there Ray finds no outward address, and
nothing it opens can be reached from another machine. `in_private_loopback` tells whether this
process is in such a namespace, and `python -m simulations.operations.ray_cluster -- <command>`
runs a command in a new one.

Flower 1.41's simulation (`RayBackend.init_ray`) calls `ray.init()` without an address, which
joins the cluster named by `RAY_ADDRESS` in its environment: the environment of the SuperLink
that starts it (`local_simulation(..., ray_address=cluster.address)`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from simulations.operations.processes import (
    MARKER_ENV,
    DeploymentError,
    free_ports,
    start_process,
    stop_processes,
    tail,
)

LOOPBACK = "127.0.0.1"
UNSHARE = ("unshare", "--user", "--map-root-user", "--net", "--uts")
_STARTED = "Ray runtime started"  # what `ray start` prints once its node is up
_ACTOR = "ClientAppActor"  # Flower's Ray actor that runs ClientApps: its process title names it


def in_private_loopback() -> bool:
    """Whether this process's loopback is up and every other network interface down (a new
    network namespace may hold tunnel devices, down, where the host loads their modules)."""
    stats = psutil.net_if_stats()
    return "lo" in stats and stats["lo"].isup and not any(s.isup for name, s in stats.items() if name != "lo")


def _fresh_namespace() -> bool:
    """Whether no interface is up: a network namespace just made, whose loopback is still down."""
    return not any(stats.isup for stats in psutil.net_if_stats().values())


def private_loopback_unavailable() -> str | None:
    """Why a private loopback namespace cannot be made here, or None when it can."""
    if shutil.which("unshare") is None:
        return "the `unshare` command (util-linux) is not installed"
    done = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        return f"`{' '.join(UNSHARE)} true` failed: {(done.stderr or done.stdout).strip()[:300]}"
    return None


def private_loopback_command(command: list[str]) -> list[str]:
    """`command`, run in a new network namespace whose loopback is up and is its only interface."""
    return [*UNSHARE, "--", sys.executable, "-m", "simulations.operations.ray_cluster", "--", *command]


def _bring_up_loopback() -> None:
    """In a new network namespace the loopback is down: up, as `ip link set lo up` would; and the
    host name `localhost`, where Ray's fallback for its node address looks."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = fcntl.ioctl(sock, siocgifflags, struct.pack("16sh14x", b"lo", 0))
        flags = struct.unpack("16sh14x", request)[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))
    socket.sethostname("localhost")


@dataclass(frozen=True)
class RayNode:
    name: str  # "head", "worker-1", ...
    process: subprocess.Popen[bytes]  # `ray start --block`: its node's processes are its descendants
    log: Path

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def client_actors(self) -> set[int]:
        """The Flower ClientApp actors running on this node now (process ids)."""
        found = set()
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                if _ACTOR in proc.name() or any(_ACTOR in part for part in proc.cmdline()):
                    found.add(proc.pid)
        return found

    def listening(self) -> set[str]:
        """The addresses this node's processes listen on (host:port)."""
        found = set()
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                found |= {f"{c.laddr.ip}:{c.laddr.port}" for c in proc.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN}
        return found


@dataclass(frozen=True)
class RayCluster:
    address: str  # the head's GCS, host:port: what RAY_ADDRESS names
    nodes: tuple[RayNode, ...]


@contextlib.contextmanager
def local_ray_cluster(log_dir: Path, *, nodes: int = 2, cpus_per_node: int = 1, startup_timeout: float = 120.0,
                      stop_timeout: float = 20.0) -> Iterator[RayCluster]:
    """A head and `nodes - 1` worker nodes on 127.0.0.1, each with `cpus_per_node` CPUs for Ray
    to schedule; stopped (by process group, then by the marker their processes inherit) on exit.
    Must run in a private loopback namespace (see the module's text)."""
    if nodes < 1 or cpus_per_node < 1:
        raise ValueError(f"a cluster needs at least one node of one CPU (nodes={nodes}, cpus_per_node={cpus_per_node})")
    if not in_private_loopback():
        raise DeploymentError("a loopback Ray cluster needs a network namespace whose only interface is the loopback "
                              "(else Ray binds every interface): run the command through "
                              "`python -m simulations.operations.ray_cluster -- <command>` under `unshare`")
    log_dir = Path(log_dir).absolute()
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER_ENV: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a worker joins the head it is given, never one from the caller's environment
    gcs_port, client_port = free_ports(2)
    address = f"{LOOPBACK}:{gcs_port}"
    # Ray's sockets live under its temp dir, whose path must stay short (a Unix socket path holds
    # 107 bytes): a fresh folder under the system's temp, removed on exit.
    temp_dir = Path(tempfile.mkdtemp(prefix="nq-ray-"))
    common = ["ray", "start", "--block", f"--node-ip-address={LOOPBACK}", f"--num-cpus={cpus_per_node}",
              "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    started: list[RayNode] = []
    try:
        deadline = time.monotonic() + startup_timeout
        for index in range(nodes):
            name = "head" if index == 0 else f"worker-{index}"
            options = (["--head", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
                        "--include-dashboard=false", f"--dashboard-host={LOOPBACK}"]
                       if index == 0 else [f"--address={address}"])
            log = log_dir / f"ray-{name}.log"
            node = RayNode(name, start_process([*common, *options], env=env, cwd=None, log=log), log)
            started.append(node)
            _wait_started(node, deadline)
        yield RayCluster(address=address, nodes=tuple(started))
    finally:
        stop_processes([node.process for node in started], marker, stop_timeout)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_started(node: RayNode, deadline: float) -> None:
    while True:
        if _STARTED in node.log.read_text(encoding="utf-8", errors="replace"):
            return
        if node.process.poll() is not None:
            raise DeploymentError(f"Ray's {node.name} node exited with code {node.process.returncode}{tail(node.log)}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"Ray's {node.name} node did not start in time{tail(node.log)}")
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    """`python -m simulations.operations.ray_cluster -- <command>` as the target of
    `private_loopback_command`: inside the new namespace, bring the loopback up and become `command`."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: unshare --user --map-root-user --net --uts -- python -m simulations.operations.ray_cluster "
              "-- <command> [args...]", file=sys.stderr)
        return 2
    if not _fresh_namespace():
        up = sorted(name for name, stats in psutil.net_if_stats().items() if stats.isup)
        print(f"refused: this process is not in a network namespace of its own (interfaces up: {', '.join(up)}); "
              "start it through `unshare --net`", file=sys.stderr)
        return 2
    _bring_up_loopback()
    _end_with_parent()
    os.execvp(argv[0], argv)


def _end_with_parent() -> None:
    """SIGTERM to this process when the one that started it dies (a SIGKILL there included), so
    that the command in the namespace, and the cluster it stops on SIGTERM, never outlive it.
    Linux's PR_SET_PDEATHSIG; kept across exec."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the parent died before the call: nobody is left to wait for us
        raise SystemExit(130)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

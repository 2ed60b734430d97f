#!/usr/bin/env bash
# A GPU check that anyone can run (issue 19): the gpu-marked tests and the GPU timings, in one go.
#
#   benchmarks/gpu_check.sh [--cpu-dry-run] [OUTDIR]     # OUTDIR: default $OUT if set, else gpu_check/
#
# Set-up first (not part of the time budget below):
#   - .venv: used as it is when `.venv/bin/python` imports fedsim and torch. Otherwise it is created:
#     `python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'`, with --system-site-packages when
#     the machine's python3 already has a CUDA build of torch (pip then keeps that torch and fetches
#     only the rest). Expect about 4-6 minutes with a fresh CUDA torch from the registry (several GB),
#     1-2 minutes when the machine's torch is reused. Offline, put wheels of the missing packages in
#     .whl/ (flwr, ray, open_clip_torch, lpips, opacus, tomli-w and what they need): pip then installs
#     from there with --no-index.
#   - `.venv/bin/fedsim pretrain`: pre-trains the tiny CLIP once per machine (on the CPU: about 2.5
#     minutes on 2 cores, about 1 on 16), or finds it under $FEDSIM_CACHE (default ~/.cache/fedsim).
#
# Then the measuring part, under 8 minutes on one GPU (an H200): every step has its own timeout
# and all of them together at most $GPU_CHECK_BUDGET seconds (default 450); a step that fails or
# times out is recorded and the script goes on. Steps, most important first:
#   env          nvidia-smi -L, the driver, torch / CUDA / cuDNN versions, the packages
#   tests        pytest -m gpu -rs tests (tests/test_gpu.py: DP-SGD's vmap, every attack, MIP's
#                Jacobian and label search, a 4-client Ray run, a sweep at 0.5 GPU per trial)
#   throughput   benchmarks/gpu_throughput.py: a 16-client round of the tiny CLIP, GPU against CPU
#   vit_ctx4     benchmarks/mip_speed.py on ViT-B-32 (random init, 224 px), CoOp with 4 context vectors:
#                text Jacobian, one MIP refinement step against one plain image-encoder inversion step
#   equal_time   benchmarks/mip_speed.py --equal-time 4: MIP against DLG and Inverting Gradients at
#                equal wall time (pre-trained tiny CLIP, CoOp, 4 digits)
#   vit_ctx16    as vit_ctx4 with 16 context vectors
# Without CUDA (or with --cpu-dry-run) the tests run (and skip, unless CUDA is there after all), the
# GPU timings are skipped with a line saying so, and tiny-CLIP CPU variants of the two benchmarks
# check that they run: about 1-2 minutes on 2 cores.
#
# What it writes into OUTDIR (7 files at most):
#   summary.txt    the environment, then one line per step: status, seconds, headline figures
#   gpu_check.log  every step's whole output
#   pytest_gpu.xml the tests' JUnit report
#   *.json         each benchmark's figures (throughput, vit_ctx4, vit_ctx16, equal_time; on CPU
#                  cpu_dry_mip_speed and cpu_dry_throughput)
# Exit status: 0 when every step passed or was skipped, 1 when one failed or timed out, 2 when the
# set-up failed.
set -u
cd "$(dirname "$0")/.."

DRY=0
ARGS=()
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) ARGS+=("$arg") ;;
    esac
done
OUTDIR=${ARGS[0]+"${ARGS[0]}"}
OUTDIR=${OUTDIR:-${OUT:-gpu_check}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
SUMMARY=$OUTDIR/summary.txt
: >"$LOG"
: >"$SUMMARY"
export FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=.venv/bin/python
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }
record() { printf '%-18s %-28s %6ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY" "$LOG"; }

# ---------------------------------------------------------------------------------- set-up
setup_venv() {
    if [ -x "$PY" ] && "$PY" -c "import fedsim, torch" 2>/dev/null; then
        return 0
    fi
    [ -L .venv ] && [ ! -e .venv ] && rm .venv  # a link to another machine's cache: gone here
    local base=${PYTHON:-python3} venv_flags=() pip_flags=()
    if "$base" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        venv_flags+=(--system-site-packages)  # keep the machine's CUDA torch
        echo "set-up: creating .venv on $base's site-packages (its torch sees CUDA)"
    else
        echo "set-up: creating .venv (pip resolves torch from the registry)"
    fi
    if [ -d .whl ]; then  # offline: no registry, and no build isolation (it would fetch setuptools)
        pip_flags+=(--no-index --find-links .whl --no-build-isolation)
        echo "set-up: installing from the wheels in .whl/ only (--no-index)"
    fi
    "$base" -m venv ${venv_flags[@]+"${venv_flags[@]}"} .venv || return 1
    "$PY" -m pip install -q ${pip_flags[@]+"${pip_flags[@]}"} -e '.[dev]' && return 0
    if [ -d .whl ]; then
        # A partial set of wheels (ray's is larger than some runners carry): install what is there
        # and fedsim without its dependencies; the import check below says whether that is enough,
        # and the tests that need what is missing say so.
        echo "set-up: the full install failed; installing .whl/*.whl and fedsim without dependencies"
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation .whl/*.whl &&
            "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    else
        return 1
    fi
}

start=$(date +%s)
say "== set-up ($(date -u +%FT%TZ))"
setup_venv 2>&1 | tee -a "$LOG"
if ! "$PY" -c "import fedsim, torch, flwr, open_clip" 2>>"$LOG"; then
    record setup FAILED $(( $(date +%s) - start )) "no working .venv (see gpu_check.log)"
    exit 2
fi
timeout 900 .venv/bin/fedsim pretrain 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    record setup "FAILED rc=$rc" $(( $(date +%s) - start )) "fedsim pretrain"
    exit 2
fi

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$CUDA" = 1 ] && [ "$DRY" = 0 ]; then
    MODE=gpu
else
    MODE=cpu-dry-run
fi
SETUP_S=$(( $(date +%s) - start ))

# ---------------------------------------------------------------------------------- the steps
BUDGET=${GPU_CHECK_BUDGET:-450}
T0=$(date +%s)

# step NAME LIMIT_S CMD...: run CMD under `timeout`, at most what is left of the budget; record it.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    if [ "$left" -lt 15 ]; then
        record "$name" "skipped: out of time budget" 0
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say ""
    say "== $name (timeout ${limit}s): $*"
    local t=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]} status=ok
    local secs=$(( $(date +%s) - t ))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT after ${limit}s"
        FAILED=1
    elif [ "$rc" -ne 0 ]; then
        status="FAILED rc=$rc"
        FAILED=1
    fi
    record "$name" "$status" "$secs" "$(headline "$name")"
}

# headline NAME: the figures worth a line in summary.txt, from the step's own output file
headline() {
    case "$1" in
        tests) grep -aE '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$LOG" | tail -n 1 | tr -d '=' ;;
        *) [ -f "$OUTDIR/$1.json" ] && "$PY" - "$OUTDIR/$1.json" <<'PYEOF' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
parts = []
if "equal_time" in d:
    e = d["equal_time"]
    parts.append("equal time {:.1f} s: MIP {mip:.1f} dB, DLG {dlg:.1f} dB, IG {ig:.1f} dB".format(
        e["median_seconds"], **e["median_psnr"]))
if "mip_over_plain" in d:
    parts.append("MIP step {:.1f} ms = {:.2f} x plain inversion {:.1f} ms; end-to-end {:.1f} x".format(
        1000 * d["mip_iteration_s"], d["mip_over_plain"], 1000 * d["plain_inversion_step_s"],
        d["end_to_end_over_plain"]))
if "jacobian_s" in d:
    parts.append("Jacobian {:.1f} s {}; label {} vs {}".format(d["jacobian_s"], d["jacobian_shape"], d["label"],
                                                          d["true_label"]))
for r in d.get("rows", []):
    if "s_per_client" in r:
        parts.append("{} b{}: {:.1f} clients/s".format(r["device"], r["batch_size"], r["clients_per_s"]))
for b, x in d.get("gpu_speedup", {}).items():
    parts.append("GPU/CPU b{}: {:.2f} x".format(b, x))
print("; ".join(parts))
PYEOF
        ;;
    esac
}

{
    echo "fedsim GPU check, $(date -u +%FT%TZ), mode: $MODE, set-up ${SETUP_S}s, budget ${BUDGET}s"
    echo "host $(hostname), $(nproc) CPUs; repo $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'PYEOF' 2>&1
import importlib.metadata as md, platform, torch
print(f"python {platform.python_version()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs")


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"


print("packages: " + ", ".join(f"{n} {version(n)}" for n in ("fedsim", "flwr", "ray", "open_clip_torch",
                                                            "torchvision", "peft", "opacus", "pytest-timeout")))
PYEOF
    echo
    printf '%-18s %-28s %7s  %s\n' step status seconds figures
} | tee -a "$LOG" >"$SUMMARY"

TIMEOUT_FLAG=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAG=(--timeout 240)
# --continue-on-collection-errors: a test module that cannot import here (a package missing on an
# offline machine) is reported, and the gpu tests still run
step tests 260 "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider ${TIMEOUT_FLAG[@]+"${TIMEOUT_FLAG[@]}"} \
    --continue-on-collection-errors --junitxml "$OUTDIR/pytest_gpu.xml" tests
if [ "$MODE" = gpu ] && ! headline tests | grep -q passed; then  # CUDA is here: skipping all is a failure
    record tests-check FAILED 0 "no gpu test passed although torch sees CUDA"
    FAILED=1
fi

if [ "$MODE" = gpu ]; then
    step throughput 60 "$PY" benchmarks/gpu_throughput.py --devices cuda cpu --clients 16 --batch-sizes 1 16 \
        --repeats 3 --run --json "$OUTDIR/throughput.json"
    step vit_ctx4 90 "$PY" benchmarks/mip_speed.py --model ViT-B-32 --device cuda --n-ctx 4 --repeats 5 \
        --json "$OUTDIR/vit_ctx4.json"
    step equal_time 90 "$PY" benchmarks/mip_speed.py --model tiny-clip --device cuda --skip-jacobian \
        --equal-time 4 --repeats 5 --json "$OUTDIR/equal_time.json"
    step vit_ctx16 120 "$PY" benchmarks/mip_speed.py --model ViT-B-32 --device cuda --n-ctx 16 --repeats 5 \
        --json "$OUTDIR/vit_ctx16.json"
else
    why=$([ "$CUDA" = 1 ] && echo "--cpu-dry-run" || echo "no CUDA here")
    for name in throughput vit_ctx4 equal_time vit_ctx16; do
        record "$name" "skipped ($why)" 0 "GPU timing; run this script on a GPU machine"
    done
    say ""
    say "GPU timings skipped ($why): running tiny-CLIP CPU variants of the benchmarks to check they run"
    step cpu_dry_mip_speed 90 "$PY" benchmarks/mip_speed.py --model tiny-clip --device cpu --repeats 1 \
        --equal-time 1 --mip-iterations 5 --json "$OUTDIR/cpu_dry_mip_speed.json"
    step cpu_dry_throughput 60 "$PY" benchmarks/gpu_throughput.py --devices cpu --clients 16 --batch-sizes 16 \
        --repeats 1 --json "$OUTDIR/cpu_dry_throughput.json"
fi

say ""
say "== done in $(( $(date +%s) - T0 ))s of measuring (budget ${BUDGET}s), set-up ${SETUP_S}s; figures in $OUTDIR"
cat "$SUMMARY"
exit "$FAILED"

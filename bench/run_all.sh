#!/usr/bin/env bash
# Runs the benchmark suite and keeps each script's output in OUT_DIR/<name>.log.
#
# Usage: bench/run_all.sh OUT_DIR [cpu|cuda]
#   Each benchmark runs under its own time limit (seconds: BENCH_LIMIT_S, default 3600; on a lent GPU
#   machine the limits below keep the whole suite inside one short session) so that one that hangs
#   does not cost the others; a failed one is reported and the rest still run.
#   PQM_BENCH_DEMO points the benchmarks at another copy of the demo experiment (see decode_speed.py).
set -u
out=${1:?usage: bench/run_all.sh OUT_DIR [cpu|cuda]}
device=${2:-cpu}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "${out}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python=${PYTHON:-$here/../tools/venv/bin/python}  # the installed stack (tools/install.sh), else the system's
[ -n "${PYTHON:-}" ] || [ -x "$python" ] || python=python3

run() {  # run NAME LIMIT_S SCRIPT ARGS...: one benchmark, its log, its status
    local name=$1 limit=${BENCH_LIMIT_S:-$2}; shift 2
    echo "== ${name}: $*"
    local t0=${SECONDS}
    timeout "${limit}" "${python}" "${here}/$@" > "${out}/${name}.log" 2>&1
    local rc=$?
    echo "== ${name}: exit ${rc} after $((SECONDS - t0)) s; last line:"
    tail -n 1 "${out}/${name}.log"
}

if [ "${device}" = cuda ]; then
    run multi_speaker 150 multi_speaker.py --device cuda --wait_load 1000
    # interleaved: separate GPU processes of the same variant differ by up to 1.5x (docs/PERFORMANCE.md)
    run decode_speed 360 decode_speed.py --device cuda --models conformer whisper_base whisper_tiny \
        --variants fp nf4_fast nf4_lora nf4_lora_fold --double_quant --repeats 15 --interleave --wait_load 1000 \
        --json "${out}/decode_speed.json"
    run adapt_cost 120 adapt_cost.py --device cuda --wait_load 1000
    run fold_vs_unmerged 120 fold_vs_unmerged.py --device cuda
else
    run compression 3600 compression.py
    run decode_speed 3600 decode_speed.py --device cpu --variants fp nf4_plain nf4_fast nf4_lora nf4_lora_fold \
        --n1 2 --wait_load 1000 --json "${out}/decode_speed.json"
    run identity 3600 decode_speed.py --identity 1 --identity_limit 3
    run identity_conformer 3600 decode_speed.py --identity 4 --identity_limit 3 --identity_model conformer
    run multi_speaker 3600 multi_speaker.py --device cpu --wait_load 1000
    run adapt_cost 3600 adapt_cost.py --device cpu --wait_load 1000
    run fold_vs_unmerged 3600 fold_vs_unmerged.py --device cpu
fi

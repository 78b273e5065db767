#!/usr/bin/env bash
# The paper-sized Conformer (conf/conformer/model_ls100.yaml) through the whole LibriSpeech-SA recipe on a
# lent GPU machine (docs/GPU.md says what that machine is and why the run is cut this way). From the
# repository root there, with the corpus packed by docs/gpu/opus_corpus.py in .gpu/corpus and the Python
# dependencies the machine lacks as wheels in .whl/:
#   bash docs/gpu/lent_gpu.sh part1 LIMIT SECONDS   set up; stages 1-3; stage 4 for about SECONDS; stage 5;
#                                                   the base to $OUT (fp16, in pieces); then as part2
#   bash docs/gpu/lent_gpu.sh part2 LIMIT           what is left of stages 5-8 (the same machine, still warm:
#                                                   finished stages and units are skipped), RESULTS.md
#   bash docs/gpu/lent_gpu.sh export LIMIT          only the base to $OUT
# Stages 6-8 overlap where they do not depend on each other: stage 6 (LoRA pretraining) runs beside the
# scratch adapters of stage 7, then the PQM adapters, then stage 8.
# Each part stops its stages in time to copy results and logs to $OUT within LIMIT seconds.
# PQM_GPU_SETUP=0 skips the set-up (a machine with tools/venv).
set -euo pipefail
part=${1:-}; limit=${2:-560}; budget=${3:-240}
root=$PWD; out=${OUT:-$root/gpu_out}; mkdir -p "$out"
recipe=$root/egs/librispeech_sa
log() { echo "$(date '+%H:%M:%S') [lent_gpu $SECONDS s] $*" | tee -a "$out/$part.log" >&2; }
opts=(--model conformer --corpus_dir "$recipe/downloads/gpu_corpus" --datadir data_gpu --dumpdir dump_gpu
      --model_config "${PQM_GPU_MODEL:-conf/conformer/model_ls100.yaml}"
      --base_train_config "${PQM_GPU_TRAIN:-conf/conformer/train_gpu_demo.yaml}" --nbpe "${PQM_GPU_NBPE:-300}"
      --ngpu "${PQM_GPU_NGPU:-1}" --nj 12 --jobs_per_gpu 12 --baselines ""
      --pretrain_args "--batch_size 32 --max_epoch ${PQM_GPU_PRETRAIN_EPOCHS:-2}")
# ESPnet's phoneme tokenizer imports g2p_en, which asks nltk to download two corpora when it cannot find them;
# that machine reaches no network. Empty archives under NLTK_DATA satisfy the look-up (neither is used).
export NLTK_DATA=$root/tools/venv/nltk_data
for f in taggers/averaged_perceptron_tagger_eng.zip corpora/cmudict.zip; do
  [ -f "$NLTK_DATA/$f" ] || python3 -c 'import sys, os, zipfile; os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True); zipfile.ZipFile(sys.argv[1], "w").close()' "$NLTK_DATA/$f"
done
[ -z "${PQM_GPU_DATA_OPTS:-}" ] || opts+=(--data_opts "$PQM_GPU_DATA_OPTS" --nj 1 --jobs_per_gpu 1)
[ -z "${PQM_GPU_NUTTS:-}" ] || opts+=(--nutts "$PQM_GPU_NUTTS")

# tools/venv as path.sh expects it, over the image's own Python (torch, peft, sentencepiece, ...): a wrapper for
# python and an activate script that puts the carried wheels (installed into tools/venv/site) and this
# checkout first on PYTHONPATH. tools/venv is ignored by git, so it stays for part2 while the machine is warm.
setup() {
  [ "${PQM_GPU_SETUP:-1}" = 1 ] || return 0
  log "set-up: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
  local venv=$root/tools/venv
  mkdir -p "$venv/bin" "$venv/site"
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > "$venv/bin/python"
  chmod +x "$venv/bin/python"; ln -sf python "$venv/bin/python3"
  printf 'export PATH="%s/bin:$PATH"\nexport PYTHONPATH="%s/site:%s${PYTHONPATH:+:$PYTHONPATH}"\n' \
    "$venv" "$venv" "$root" > "$venv/bin/activate"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$venv/site" .whl/*.whl
  # the carried peft is the one the tests ran with; if it does not import beside the image's transformers,
  # the image's own peft is used instead
  (. "$venv/bin/activate" && python -c 'import peft.tuners.lora') 2>/dev/null || {
    log "carried peft does not import here: using the image's"; rm -rf "$venv"/site/peft "$venv"/site/peft-*; }
  # shellcheck disable=SC1091
  (. "$venv/bin/activate" && python -c 'import pqm_ext.tasks.pqm_asr, espnet2.tasks.asr, espnet2.bin.asr_inference, bitsandbytes, jiwer, kaldiio, librosa, torch; import peft, transformers; print("imports ok: torch", torch.__version__, "peft", peft.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(0))') 2>&1 | tail -1 | tee -a "$out/$part.log"
  (. "$venv/bin/activate" && python docs/gpu/opus_corpus.py unpack .gpu/corpus "$recipe/downloads/gpu_corpus" --nj 16)
}

# timeout(1) puts itself and run.sh in a process group of their own (its pid) and returns once run.sh is gone,
# while the launcher in that group may still be stopping its jobs and writing their logs: wait for the group
# to empty before reading the logs or starting the stage again.
# (The group holds timeout, run.sh and the launcher, not the jobs, which have sessions of their own; the launcher
# waits for its jobs after SIGTERM, so an empty group means they are gone too.) At most 60 s, and not past LIMIT.
settle() {
  local i wait=$((limit - SECONDS - 10))
  [ "$wait" -le 60 ] || wait=60
  [ "$wait" -ge 1 ] || wait=1
  for i in $(seq "$wait"); do pgrep -g "$1" >/dev/null || return 0; sleep 1; done
  log "process group $1 still running after $wait s"
}

# Start run.sh "${opts[@]}" ARGS in the background under timeout(1) (SIGTERM after SECONDS: the launcher stops
# its jobs), from the recipe: start SECONDS ARGS...; its pid is $!
start() {
  local seconds=$1; shift
  (cd "$recipe" && exec timeout -s TERM "$seconds" ./run.sh "${opts[@]}" "$@" >> "$out/$part.log" 2>&1) &
}

# Wait for a started run.sh and the launcher it leaves stopping its jobs; the status is run.sh's (124: timeout).
reap() {
  local rc=0
  wait "$1" || rc=$?
  settle "$1"
  return "$rc"
}

# run.sh "${opts[@]}" "$@", stopped when the part's LIMIT comes near
stages() {
  local left=$((limit - SECONDS - 20)) rc=0
  [ "$left" -gt 10 ] || { log "no time left for stages $*"; return 1; }
  start "$left" "$@"
  reap $! || rc=$?
  [ "$rc" = 0 ] || log "run.sh $* ended with status $rc (124: out of time)"
  return "$rc"
}

# the number of the last epoch ESPnet finished / started, from its log (0: none)
last_epoch() { { grep -oE "[0-9]+(/[0-9]+)?epoch $1" "$recipe/exp/conformer/base_train/train.log" 2>/dev/null || echo 0; } | tail -1 | grep -o "^[0-9]*"; }

# Stage 4 until about $budget seconds, stopped as the next epoch starts (the last one's checkpoint and
# model files are complete by then); ESPnet then resumes with --max_epoch = the epochs done, which only
# averages the best checkpoints, as at the end of any training.
stage4() {
  cd "$recipe"
  [ ! -f exp/conformer/base/model.safetensors ] || { log "stage 4 done before"; return 0; }
  local t0=$SECONDS pid seen=0 hard=$((limit - SECONDS - 90))
  [ "$hard" -gt "$budget" ] || { log "LIMIT $limit leaves no room for $budget s of stage 4"; exit 1; }
  start "$hard" --stage 4 --stop_stage 4
  pid=$!
  while kill -0 $pid 2>/dev/null; do
    sleep 2
    if [ $((SECONDS - t0)) -ge "$budget" ]; then
      [ "$seen" -gt 0 ] || seen=$(( $(last_epoch started) > 1 ? $(last_epoch started) : 1 ))
      if [ "$(last_epoch started)" -gt "$seen" ]; then
        log "time is up: stopping stage 4 as epoch $(last_epoch started) starts"; kill -TERM $pid || true; break
      fi
    fi
  done
  reap $pid || true
  if [ ! -f exp/conformer/base/model.safetensors ]; then
    local k; k=$(last_epoch results)
    [ "$k" -gt 0 ] || { log "stage 4 finished no epoch"; exit 1; }
    log "stage 4: finishing at $k epochs"
    stages --stage 4 --stop_stage 4 --asr_args "--max_epoch $k"
  fi
  log "stage 4 took $((SECONDS - t0)) s"
  cd "$root"
}

collect() {
  cd "$recipe"
  # $OUT returns at most 8 files: the base's 4 pieces, part's log, this archive and the table (the plot and
  # every log, stage 4's ESPnet log included, are in the archive)
  for f in exp/conformer/RESULTS.md exp/conformer/results.json; do
    [ ! -f "$f" ] || cp "$f" "$out/"
  done
  tar czf "$out/logs_$part.tgz" --ignore-failed-read $(ls -d exp/conformer/*/*.log exp/conformer/base*/config.yaml \
    exp/conformer/*/size_report.* exp/conformer/*/log exp/conformer/*/*/log data_gpu/sa_splits/prepare.yaml \
    exp/conformer/wer_vs_n.png 2>/dev/null) 2>/dev/null || true
  cd "$root"
}

# The base as it left stage 4, in float16 (its format record kept) and in pieces of 15 MiB ($OUT takes files of
# at most 16 MiB), so that it can be carried to another machine: `cat base_fp16.tar.* | tar x` gives base/,
# a model directory that --pretrained_model takes. A by-product: a failure here is logged, the run goes on.
export_base() {
  local exp=$recipe/exp/conformer
  [ $((limit - SECONDS)) -gt 60 ] || { log "no time left to export the base"; return 1; }
  rm -rf "$exp/base_fp16"; mkdir -p "$exp/base_fp16/base"
  cp -r $(ls -d "$exp"/base/* | grep -v '/model.safetensors$') "$exp/base_fp16/base/" || return 1
  (. "$root/tools/venv/bin/activate" && python -c 'import sys
from safetensors import safe_open
from safetensors.torch import load_file, save_file
with safe_open(sys.argv[1], "pt") as f:
    meta = f.metadata()
w = load_file(sys.argv[1])
save_file({k: v.half() if v.is_floating_point() else v for k, v in w.items()}, sys.argv[2], metadata=meta)' \
    "$exp/base/model.safetensors" "$exp/base_fp16/base/model.safetensors") || return 1
  tar cf - -C "$exp/base_fp16" base | split -b 15M - "$out/base_fp16.tar." || return 1
  rm -rf "$exp/base_fp16"; touch "$exp/base/.exported"
  log "base exported: $(ls "$out"/base_fp16.tar.* | wc -l) pieces"
}

# Stages 6-8 in what is left of LIMIT: stage 6 beside stage 7's scratch adapters (they do not need its
# pretrained LoRA), then stage 7 again (its scratch units are skipped), then stage 8
rest() {
  local left=$((limit - SECONDS - 20)) p6 p7 rc=0
  [ "$left" -gt 30 ] || { log "no time left for stages 6-8"; return 1; }
  log "stage 6 beside stage 7 (scratch)"
  start "$left" --stage 6 --stop_stage 6; p6=$!
  start "$left" --stage 7 --stop_stage 7 --inits scratch; p7=$!
  reap $p6 || { rc=$?; log "stage 6 ended with status $rc (124: out of time)"; }
  reap $p7 || { rc=$?; log "stage 7 (scratch) ended with status $rc (124: out of time)"; }
  [ "$rc" = 0 ] || return 1
  log "stages 7 (PQM) and 8"; stages --stage 7 --stop_stage 8
}

trap collect EXIT
case $part in
  part1)
    setup
    log "stages 1-3"; stages --stop_stage 3
    stage4
    log "stage 5"; stages --stage 5 --stop_stage 5
    export_base || log "the base was not exported"
    rest || { log "part1 ends here: part2 goes on"; exit 0; }
    ;;
  part2)
    [ -x tools/venv/bin/python ] || { log "no tools/venv: part2 runs on the machine part1 set up"; exit 1; }
    log "stage 5 (kept if part1 made it)"; stages --stage 5 --stop_stage 5
    [ -f "$recipe/exp/conformer/base/.exported" ] || export_base || log "the base was not exported"
    rest
    ;;
  export) export_base ;;
  *) echo "usage: $0 part1 LIMIT SECONDS | part2 LIMIT | export LIMIT" >&2; exit 2 ;;
esac
log "$part done"

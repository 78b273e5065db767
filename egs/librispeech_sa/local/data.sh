#!/usr/bin/env bash
# LibriSpeech -> Kaldi data dirs for PQM (run from egs/librispeech_sa):
#   <data_dir>/pretrain   LoRA pretraining pool (train-clean-100)
#   <data_dir>/dev        validation set (dev-clean)
#   <data_dir>/sa_adapt   LibriSpeech-SA adaptation pools (targets drawn from train-clean-360)
#   <data_dir>/sa_test    LibriSpeech-SA test sets
#   <data_dir>/sa_splits  <spk>.adapt (recipe order: first N = N-utterance set), <spk>.test, prepare.yaml
# The corpus is LIBRISPEECH from db.sh (the LibriSpeech directory or the one holding it), or --corpus.
# A finished preparation with the same options is skipped. See pqm_ext/data/librispeech.py.
set -euo pipefail

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') (${BASH_SOURCE[1]##*/}:${BASH_LINENO[0]}) $*" >&2; }

data_dir=data
corpus=""                # default: LIBRISPEECH from db.sh
num_target_speakers=20
max_adapt=100            # adaptation pool per target speaker (the recipe uses its first N)
min_adapt=""             # fewest adaptation utterances a target may have (empty: max_adapt)
num_test=20              # test utterances per target speaker
seed=0
target_speakers=""       # space-separated reader ids instead of a random draw
check_audio=header       # none | header | decode
overwrite=false

options="data_dir corpus num_target_speakers max_adapt min_adapt num_test seed target_speakers check_audio overwrite"
help_message="Usage: $0 [--name value] ..."
. "$(dirname "$(readlink -f "$0")")/../utils/parse_options.sh"  # works from any directory
if [ $# -gt 0 ]; then log "unexpected argument '$1'"; exit 1; fi

if [ -f db.sh ]; then . ./db.sh; fi
if [ -f path.sh ]; then . ./path.sh; fi
corpus=${corpus:-${LIBRISPEECH:-}}
if [ -z "$corpus" ]; then
  log "LIBRISPEECH is empty: set it in db.sh to the directory holding LibriSpeech/ (or synthesise the demo" \
      "corpus: python -m pqm_ext.bin.synth_demo_corpus --layout librispeech --out DIR)"
  exit 1
fi
if [ ! -d "$corpus" ]; then
  log "LIBRISPEECH=$corpus: no such directory (set it in db.sh)"
  exit 1
fi

log "preparing LibriSpeech from $corpus into $data_dir"
python -m pqm_ext.bin.prepare_librispeech_sa --corpus "$corpus" --data_dir "$data_dir" \
  --num_target_speakers "$num_target_speakers" --max_adapt "$max_adapt" ${min_adapt:+--min_adapt "$min_adapt"} \
  --num_test "$num_test" --seed "$seed" --target_speakers "$target_speakers" --check_audio "$check_audio" \
  --overwrite "$overwrite"
log "done: $data_dir/{pretrain,dev,sa_adapt,sa_test,sa_splits}"

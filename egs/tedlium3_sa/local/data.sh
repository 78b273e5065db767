#!/usr/bin/env bash
# TED-LIUM 3 (legacy split) -> Kaldi data dirs for PQM (run from egs/tedlium3_sa):
#   <data_dir>/pretrain   LoRA pretraining pool (legacy train talks not held out)
#   <data_dir>/dev        validation set (legacy dev)
#   <data_dir>/sa_adapt   SA adaptation pools (target talks held out of legacy train)
#   <data_dir>/sa_test    SA test sets
#   <data_dir>/sa_splits  <spk>.adapt (recipe order: first N = N-utterance set), <spk>.test, prepare.yaml
# The corpus is TEDLIUM3 from db.sh (TEDLIUM_release-3 or the directory holding it), or --corpus.
# Dirs have segments (utt talk start end) and wav.scp keyed by talk (sph paths); speakers are talks.
# A finished preparation with the same options is skipped. See pqm_ext/data/tedlium.py.
set -euo pipefail

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') (${BASH_SOURCE[1]##*/}:${BASH_LINENO[0]}) $*" >&2; }

data_dir=data
corpus=""                # default: TEDLIUM3 from db.sh
num_target_speakers=20
max_adapt=100            # adaptation pool per target speaker (the recipe uses its first N)
min_adapt=""             # fewest adaptation utterances a target may have (empty: max_adapt)
num_test=20              # test utterances per target speaker
seed=0
target_speakers=""       # space-separated talk ids instead of a random draw
check_audio=header       # none | header | decode
overwrite=false
sa_subsets=train         # legacy subsets the SA talks come from: train, test or "train test"
segment_padding=0.15,0.1 # seconds added before,after train/SA segments (Kaldi's; the alignments clip onsets)

options="data_dir corpus num_target_speakers max_adapt min_adapt num_test seed target_speakers check_audio overwrite sa_subsets
         segment_padding"
help_message="Usage: $0 [--name value] ..."
. "$(dirname "$(readlink -f "$0")")/../utils/parse_options.sh"  # works from any directory
if [ $# -gt 0 ]; then log "unexpected argument '$1'"; exit 1; fi

if [ -f db.sh ]; then . ./db.sh; fi
if [ -f path.sh ]; then . ./path.sh; fi
corpus=${corpus:-${TEDLIUM3:-}}
if [ -z "$corpus" ]; then
  log "TEDLIUM3 is empty: set it in db.sh to the directory holding TEDLIUM_release-3/ (or synthesise the demo" \
      "corpus: python -m pqm_ext.bin.synth_demo_corpus --layout tedlium3 --out DIR)"
  exit 1
fi
if [ ! -d "$corpus" ]; then
  log "TEDLIUM3=$corpus: no such directory (set it in db.sh)"
  exit 1
fi

log "preparing TED-LIUM 3 from $corpus into $data_dir"
python -m pqm_ext.bin.prepare_tedlium3_sa --corpus "$corpus" --data_dir "$data_dir" \
  --num_target_speakers "$num_target_speakers" --max_adapt "$max_adapt" ${min_adapt:+--min_adapt "$min_adapt"} \
  --num_test "$num_test" --seed "$seed" --target_speakers "$target_speakers" --check_audio "$check_audio" \
  --overwrite "$overwrite" --sa_subsets "$sa_subsets" --segment_padding "$segment_padding"
log "done: $data_dir/{pretrain,dev,sa_adapt,sa_test,sa_splits}"

#!/usr/bin/env bash
# PQM on TED-LIUM 3: LoRA pretraining on legacy train talks, target speakers = held-out talks.
# With TEDLIUM3 unset (db.sh) it runs the offline demo: a synthesised corpus in TED-LIUM 3's layout
# (sph + stm) and Whisper tiny.en. Examples: ./run.sh   ./run.sh --stage 5 --stop_stage 8   ./run.sh --model conformer
set -euo pipefail
. ./db.sh

if [ -n "$TEDLIUM3" ]; then   # the paper's sizes (its models: README, Real corpora)
  sizes=(--data_opts "--num_target_speakers 20 --max_adapt 100 --num_test 20" --nutts "5 10 20 30 50 100")
else                          # the demo corpus: 12 target talks, 20 adaptation + 15 test segments each
  # (its stm times already hold 0.1 s of silence each side: no more padding; 1-3 h of pool audio: a small BPE vocabulary)
  sizes=(--data_opts "--num_target_speakers 12 --max_adapt 20 --num_test 15" --nutts "5 10 20" --nbpe 100
         --demo_data_opts "--segment_padding 0,0")  # only for the synthesised corpus, not one given as --corpus_dir
fi

./pqm.sh --corpus tedlium3_sa --corpus_layout tedlium3 --corpus_dir "$TEDLIUM3" "${sizes[@]}" "$@"

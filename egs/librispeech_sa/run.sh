#!/usr/bin/env bash
# PQM on LibriSpeech-SA: LoRA pretraining on train-clean-100, target speakers from train-clean-360.
# With LIBRISPEECH unset (db.sh) it runs the offline demo: a synthesised corpus in LibriSpeech's layout
# and Whisper tiny.en. Examples: ./run.sh   ./run.sh --stage 5 --stop_stage 8   ./run.sh --model conformer
set -euo pipefail
. ./db.sh

if [ -n "$LIBRISPEECH" ]; then   # the paper's sizes (its models: README, Real corpora)
  sizes=(--data_opts "--num_target_speakers 20 --max_adapt 100 --num_test 20" --nutts "5 10 20 30 50 100")
else                             # the demo corpus: 12 target speakers, 20 adaptation + 15 test utterances each
  sizes=(--data_opts "--num_target_speakers 12 --max_adapt 20 --num_test 15" --nutts "5 10 20" --nbpe 100)  # 1-3 h of pool audio: a small BPE vocabulary
fi

./pqm.sh --corpus librispeech_sa --corpus_layout librispeech --corpus_dir "$LIBRISPEECH" "${sizes[@]}" "$@"

#!/usr/bin/env bash
# The PQM stages shared by every recipe (ESPnet's asr.sh in spirit): a recipe's run.sh sets the
# corpus options and calls this script with "$@". Every stage calls a Python entry point (`python -m
# pqm_ext.bin.<step>`; ESPnet's for Whisper's token list) or, for stage 1, the recipe's local/data.sh; a unit
# of work made from the same inputs is skipped and one made from other inputs is made again, so a re-run
# continues (stage 1 refuses data prepared with other options; stage 3 keeps an existing token list; stage 4
# keeps a base made from the same inputs and refuses to replace one made from others).
#   1 data prep (offline demo corpus when no corpus path is set)   5 quantisation + size report
#   2 format + validate data dirs                                  6 LoRA pretraining (multi-speaker pool)
#   3 token list                                                   7 speaker adaptive training (per speaker)
#   4 base model                                                   8 decoding, scoring, RESULTS.md
set -euo pipefail
log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (${BASH_SOURCE[1]##*/}:${BASH_LINENO[0]}) $*" >&2; }
SECONDS=0

# General
stage=1; stop_stage=8; nj=2; ngpu=0
seed=0                     # every random draw: the demo corpus, the target speakers, training
jobs_per_gpu=1             # stages 7-8 with --ngpu: up to this many of the --nj jobs share each GPU at once (a
                           # speaker's adapter or decode uses little of one; the local backend of cmd.sh)
model=whisper              # whisper | conformer
corpus=                    # name in result files: librispeech_sa | tedlium3_sa
corpus_layout=             # demo corpus layout: librispeech | tedlium3
corpus_dir=                # the real corpus (run.sh: from db.sh, which also picks the sizes); empty: synthesise
                           # the offline demo corpus
demo_dir=                  # where the demo corpus is made (default: downloads/demo; conformer: downloads/demo_3h)
demo_opts=                 # options of python -m pqm_ext.bin.synth_demo_corpus
data_opts=                 # options of local/data.sh
demo_data_opts=            # ... only when the demo corpus is synthesised, before data_opts (what its layout needs)
datadir=                   # Kaldi data dirs (default: data; the conformer demo: data_3h)
dumpdir=                   # formatted data dirs go to <dumpdir>/raw (default: dump; the conformer demo: dump_3h)
audio_format=wav           # stage 2's audio files: wav | flac (about half the disk; ESPnet's default)
min_wav_duration=0.1       # stage 2 leaves shorter utterances out of the pretraining pool and dev set (asr.sh's)
max_wav_duration=30        # ... and longer ones (Whisper's encoder sees 30 s; asr.sh's default is 20, but both
                           # models share dump/); empty: neither limit. Adaptation and test sets keep every utterance.
# Models
model_config=              # default: conf/<model>/model.yaml
whisper_checkpoint=        # whisper: openai-whisper checkpoint (e.g. base.en.pt); empty: bundled tiny.en
pretrained_model=          # conformer: an ESPnet model dir (config.yaml + *.pth), or a base stage 4 exported,
                           # instead of training
base_train_config=         # conformer: trainer options of the base model (default: conf/<model>/train.yaml)
nbpe=300                   # conformer: sentencepiece vocabulary size
quant=nf4                  # the quantised base that is adapted (conf/quant_<quant>.yaml)
tag=                       # a variant of stages 6-8 beside the default table: they write exp/<model>/<tag>/
                           # (adapters, decodes, RESULTS.md; same base and quant; its own LoRA pretraining if
                           # stage 6 runs with the tag, else the default exp/<model>/lora_pretrain)
baselines="int4"           # other quantisations decoded for comparison (conf/quant_<b>.yaml)
# LoRA pretraining (stage 6)
noise_scp=none             # ESPnet's on-the-fly noise for the pool (multi-condition training): a list of "<id> <wav>"
                           # lines, mono 16 kHz (one you make from MUSAN, say); demo: a synthesised set made once
                           # in downloads/noise_rir; none: off
rir_scp=none               # ... and room impulse responses (from RIRS_NOISES, say), likewise;
                           # conf/pretrain_augment.yaml sets how often and how loud
# Adaptation
nutts="5 10 20"            # adaptation utterances per speaker (first N of <datadir>/sa_splits/<spk>.adapt)
inits="scratch pretrained" # scratch | pretrained (PQM) | semi (PQM on pseudo-labels)
pseudo_labels=false        # add the semi-supervised variant: the fp model decodes the adaptation data
valid_fraction=0           # >0: hold out this fraction of a speaker's N utterances (at least 1) and keep the
                           # adapter of the epoch with the lowest held-out loss (early stopping); 0: keep the last
decode_config=             # default: conf/<model>/decode.yaml
score_cleaner=             # text normalisation before scoring, of references and hypotheses alike: none (lower
                           # case, punctuation removed) | whisper_en | whisper_basic (ESPnet's cleaners: Whisper's
                           # normalisers). Default (pqm_ext.asr.score.default_cleaner): whisper_en for whisper
                           # (an unadapted Whisper writes "Mrs.", "2008", "color"), none for conformer
mixed_batch=0              # >0: greedy decoding in batches of this many utterances from different speakers,
                           # each with its own adapter (one job decodes all its speakers together)
fold_adapters=true         # one speaker at a time: fold the adapter into the weights (W + B A s) while that
                           # speaker is decoded; false: peft's unmerged LoRA (same hypotheses, slower)
lora_args=                 # extra ESPnet trainer options for stages 6-7 (e.g. "--max_epoch 1")
pretrain_args=             # ... for stage 6 only, after lora_args (e.g. "--max_epoch 10 --optim_conf lr=0.005")
adapt_args=                # ... for stage 7 only, after lora_args
asr_args=                  # extra ESPnet trainer options for the Conformer base (stage 4)

help_message="Usage: $0 [options]  (see the comments at the top of egs/TEMPLATE/pqm.sh)"
options="stage stop_stage nj ngpu jobs_per_gpu seed model corpus corpus_layout corpus_dir demo_dir demo_opts data_opts demo_data_opts
         datadir dumpdir
         audio_format min_wav_duration max_wav_duration model_config whisper_checkpoint pretrained_model
         base_train_config nbpe quant baselines nutts inits pseudo_labels valid_fraction decode_config score_cleaner
         mixed_batch
         fold_adapters lora_args pretrain_args adapt_args asr_args tag noise_scp rir_scp"
. utils/parse_options.sh
[ $# -eq 0 ] || { log "unexpected argument: $1"; exit 1; }
. ./path.sh
. ./cmd.sh

case $model in whisper|conformer) ;; *) log "--model must be whisper or conformer, not '$model'"; exit 1 ;; esac
if [ $model = whisper ] && [ -n "$pretrained_model" ]; then
  log "--pretrained_model is a Conformer's (--model conformer); Whisper's base comes from --whisper_checkpoint"; exit 1
fi
if [ $model = conformer ] && [ -n "$whisper_checkpoint" ]; then
  log "--whisper_checkpoint is Whisper's (--model whisper); a Conformer's base comes from --pretrained_model"; exit 1
fi
for opt in stage stop_stage ngpu; do  # a typo here made every stage test false: a silent no-op
  [[ "${!opt}" =~ ^[0-9]+$ ]] || { log "--$opt must be a whole number, not '${!opt}'"; exit 1; }
done
[[ "$nj" =~ ^[1-9][0-9]*$ ]] || { log "--nj must be a positive integer, not '$nj'"; exit 1; }
if [ "$stage" -gt "$stop_stage" ]; then log "--stage $stage is after --stop_stage $stop_stage"; exit 1; fi
[[ "$jobs_per_gpu" =~ ^[1-9][0-9]*$ ]] || { log "--jobs_per_gpu must be a positive integer, not '$jobs_per_gpu'"; exit 1; }
for list in noise_scp rir_scp; do  # not at stage 6, hours later
  [ -n "${!list}" ] || { log "--$list is empty: give a list of '<id> <wav>' lines, demo or none"; exit 1; }
done
gpu_share=(); [ "$jobs_per_gpu" = 1 ] || gpu_share=(--jobs_per_gpu "$jobs_per_gpu")  # only launchers that share know it
if [ -n "$tag" ]; then  # before any stage writes: pqm_ext.asr.layout is the one place that knows the names
  problem=$(python -c 'import sys; from pqm_ext.asr.layout import tag_problem; print(tag_problem(sys.argv[1], sys.argv[2:]) or "")' \
    "$tag" $(cd conf && ls quant_*.yaml | sed 's/^quant_//; s/.yaml$//'))
  [ -z "$problem" ] || { log "$problem"; exit 1; }
fi
model_config=${model_config:-conf/$model/model.yaml}
base_train_config=${base_train_config:-conf/$model/train.yaml}
decode_config=${decode_config:-conf/$model/decode.yaml}
[ "$pseudo_labels" = true ] && [[ " $inits " != *" semi "* ]] && inits="$inits semi"
# The demo Conformer is trained from scratch on the demo pool; 1 h of it (enough for Whisper, which only
# pretrains LoRA on it) leaves the decoder spelling words it heard once. Unless told otherwise it gets a 3 h
# pool, in its own corpus, data and dump dirs, so both models' demos live side by side in one recipe.
if [ -z "$corpus_dir" ] && [ $model = conformer ] && [ -z "$pretrained_model" ] && [ -z "$demo_opts" ]; then
  demo_opts="--pool_per_speaker 180"
  demo_dir=${demo_dir:-downloads/demo_3h}; datadir=${datadir:-data_3h}; dumpdir=${dumpdir:-dump_3h}
fi
demo_dir=${demo_dir:-downloads/demo}; datadir=${datadir:-data}; dumpdir=${dumpdir:-dump}
exp=exp/$model
work=$exp${tag:+/$tag}     # stages 6-8
dump=$dumpdir/raw
run() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
# words OPTION...: the options' strings split into WORDS as a shell splits a command line, quotes kept
# together (--data_opts "--target_speakers '1089 1188'" is two words), as the entry points split --*_args
words() {
  local name w parsed
  WORDS=()
  for name in "$@"; do
    parsed=()  # python ends a good split with the word "."; "" words are kept
    while IFS= read -r -d '' w; do parsed+=("$w"); done < <(python -c 'import shlex, sys
try: sys.stdout.write("".join(w + "\0" for w in shlex.split(sys.argv[1]) + ["."]))
except ValueError: pass' "${!name}")
    [ "${#parsed[@]}" -gt 0 ] || { log "--$name '${!name}': cannot split it into words (unbalanced quotes?)"; exit 1; }
    WORDS+=("${parsed[@]:0:${#parsed[@]}-1}")
  done
}
speakers() { cut -d' ' -f1 $datadir/sa_test/spk2utt; }
check_nj() {  # check_nj N: can the target speakers be split into N jobs (stage 8: --nj)
  local total
  total=$(speakers | wc -l)
  if [ "$1" -gt "$total" ]; then log "--nj $1 is larger than the number of target speakers ($total)"; exit 1; fi
}
# split_speakers N DIR: write DIR/spk.1 .. DIR/spk.N (round robin) and print N
split_speakers() {
  local n=$1 dir=$2
  check_nj "$n"
  mkdir -p "$dir"; rm -f "$dir"/spk.*
  speakers | awk -v n="$n" -v d="$dir" '{ print > (d "/spk." ((NR - 1) % n + 1)) }'
}

if run 8 && [ -f $datadir/sa_test/spk2utt ]; then check_nj "$nj"; fi  # cheap, before ESPnet is imported below
if run 8 || { run 7 && [[ " $inits " == *" semi "* ]]; }; then  # here, not in every decoding job; and
  # stage 8's scoring cleaner (Whisper's normalisers come with openai-whisper) before, not after, decoding
  problem=$(python -c 'import os, sys; from pqm_ext.asr.recognizer import decode_config_problem
from pqm_ext.asr.score import cleaner_problem, default_cleaner
os.write(3, (decode_config_problem(sys.argv[1]) or cleaner_problem(sys.argv[2] or default_cleaner(sys.argv[3]))
             or "").encode())' "$decode_config" "$(run 8 && echo "$score_cleaner" || echo none)" "$model" \
    3>&1 >/dev/null)  # fd 3: ESPnet prints on stdout
  [ -z "$problem" ] || { log "$problem"; exit 1; }
fi

if run 1; then
  log "Stage 1: data preparation"
  if [ -z "$corpus_dir" ]; then
    log "no corpus path set (db.sh): synthesising the offline demo corpus in $demo_dir ($corpus_layout layout)"
    words demo_opts; python -m pqm_ext.bin.synth_demo_corpus --layout "$corpus_layout" --out "$demo_dir" \
      --seed "$seed" --nj "$nj" ${WORDS[@]+"${WORDS[@]}"}
    corpus_dir=$demo_dir
  else
    demo_data_opts=  # a real corpus (db.sh or --corpus_dir) gets local/data.sh's own defaults
  fi
  words demo_data_opts data_opts
  local/data.sh --corpus "$corpus_dir" --data_dir "$datadir" --seed "$seed" ${WORDS[@]+"${WORDS[@]}"}
fi

if run 2; then
  log "Stage 2: format and validate data dirs into $dump"
  for x in pretrain dev sa_adapt sa_test; do
    limits=
    if [ -n "$max_wav_duration" ] && [[ $x = pretrain || $x = dev ]]; then
      limits="--min_duration ${min_wav_duration:-0} --max_duration $max_wav_duration"
    fi
    python -m pqm_ext.bin.format_data_dir $datadir/$x $dump/$x --nj "$nj" --audio_format "$audio_format" $limits
  done
fi

if [ $model = whisper ]; then token_list=$datadir/token_list/whisper_en/tokens.txt
else token_list=$datadir/token_list/bpe_unigram$nbpe/tokens.txt; fi

if run 3; then
  log "Stage 3: token list $token_list"
  if [ -f "$token_list" ]; then log "exists: skipping"
  elif [ $model = whisper ]; then
    python -m espnet2.bin.whisper_export_vocabulary --whisper_model whisper_en --output "$token_list.tmp"
    mv "$token_list.tmp" "$token_list"
  else
    python -m pqm_ext.bin.make_bpe --text $datadir/pretrain/text --nbpe "$nbpe" --out "$(dirname "$token_list")"
  fi
fi

if run 4; then
  log "Stage 4: base model $exp/base"
  # An existing base is kept if it was made from the same inputs and refused otherwise (another checkpoint,
  # config or pool): the entry points compare its record, so that check runs here, not as a job.
  if [ $model = whisper ]; then
    python -m pqm_ext.bin.prepare_whisper_base --config "$model_config" --token_list "$token_list" \
      --checkpoint "$whisper_checkpoint" --out $exp/base
  else
    base_args=(--config "$model_config" --train_config "$base_train_config" --token_list "$token_list"
      --bpemodel "$(dirname "$token_list")/bpe.model" --train_data $dump/pretrain --valid_data $dump/dev
      --pretrained_model "$pretrained_model" --ngpu "$ngpu" --seed "$seed" --out $exp/base
      --train_args "$asr_args" --num_threads "$nj")
    if [ -f $exp/base/model.safetensors ]; then
      python -m pqm_ext.bin.train_base "${base_args[@]}"
    else
      [ -n "$pretrained_model" ] || log "training it with ESPnet; log: $exp/base_train/train.log"
      ${cuda_cmd} --gpu "$ngpu" --num_threads "$nj" $exp/base_train/train.log python -m pqm_ext.bin.train_base "${base_args[@]}"
    fi
  fi
fi

if run 5; then
  for q in $quant $baselines; do
    log "Stage 5: quantisation $q -> $exp/$q"
    # quantize keeps a model made from the same base and conf/quant_$q.yaml, and makes it again otherwise
    python -m pqm_ext.bin.quantize --model_dir $exp/base --quant_config conf/quant_$q.yaml --out $exp/$q
  done
fi

if run 6; then
  log "Stage 6: LoRA pretraining on $dump/pretrain -> $work/lora_pretrain"
  pretrain_configs=(conf/lora_trainer.yaml conf/$model/lora_pretrain.yaml); augment=
  if [ "$noise_scp" = demo ] || [ "$rir_scp" = demo ]; then  # made once, the same for every run and seed
    python -m pqm_ext.bin.synth_noise_rir --out downloads/noise_rir
  fi
  for list in noise_scp rir_scp; do
    value=${!list}
    case "$value" in
      none) ;;
      demo) augment="$augment --$list downloads/noise_rir/${list%_scp}.scp" ;;
      *) printf -v value '%q' "$value"; augment="$augment --$list $value" ;;
    esac
  done
  if [ -n "$augment" ]; then
    log "multi-condition pretraining:$augment (rates: conf/pretrain_augment.yaml)"
    pretrain_configs+=(conf/pretrain_augment.yaml)
  fi
  pretrain=(python -m pqm_ext.bin.train_adapter --model_dir $exp/$quant --train_config "${pretrain_configs[@]}"
            --train_data $dump/pretrain --valid_data $dump/dev --out $work/lora_pretrain --ngpu "$ngpu" --seed "$seed"
            --train_args "$augment $lora_args $pretrain_args")
  # an adapter made from other inputs (say --pretrain_args changed) is trained again; a current one is
  # kept without overwriting its training log; bad input (status 2) stops here, before a job is submitted
  if "${pretrain[@]}" --check; then log "exists, made from the same inputs: skipping"
  else
    status=$?; [ $status -eq 1 ] || exit $status
    ${cuda_cmd} --gpu "$ngpu" $work/lora_pretrain/train.log "${pretrain[@]}"
  fi
fi

if run 7; then
  nspk=$(speakers | wc -l)
  ! run 8 || check_nj "$nj"  # now, not after the adapters
  log "Stage 7: speaker adaptive training, $nspk speakers x N in {$nutts} x init in {$inits} -> $work/adapt"
  if [ -n "$tag" ] && [ ! -d $work/lora_pretrain/adapter ]; then
    log "--tag $tag has no stage-6 output of its own: PQM starts from $exp/lora_pretrain"
  fi
  pseudo_opt=
  if [[ " $inits " == *" semi "* ]]; then
    log "pseudo-labels: the fp model decodes the adaptation data"
    split_speakers "$nj" $work/pseudo_labels/split >/dev/null
    ${cuda_cmd} --gpu "$ngpu" ${gpu_share[@]+"${gpu_share[@]}"} JOB=1:"$nj" $work/pseudo_labels/log/decode.JOB.log \
      python -m pqm_ext.bin.decode --exp_dir $exp --out_dir $work/pseudo_labels --systems fp --data $dump/sa_adapt \
        --speakers @$work/pseudo_labels/split/spk.JOB --decode_config "$decode_config" --ngpu "$ngpu"
    cat $work/pseudo_labels/fp/hyp/*.txt | sort > $work/pseudo_labels/text
    pseudo_opt="--pseudo_text $work/pseudo_labels/text"
  fi
  split_speakers "$nspk" $work/adapt/split >/dev/null
  # shellcheck disable=SC2086
  ${cuda_cmd} --gpu "$ngpu" ${gpu_share[@]+"${gpu_share[@]}"} --max_jobs_run "$nj" JOB=1:"$nspk" $work/adapt/log/adapt.JOB.log \
    python -m pqm_ext.bin.adapt_speakers --exp_dir $exp --tag "$tag" --quant $quant --data $dump/sa_adapt \
      --splits $datadir/sa_splits --speakers @$work/adapt/split/spk.JOB --nutts $nutts --inits $inits $pseudo_opt \
      --ngpu "$ngpu" --seed "$seed" \
      --valid_fraction "$valid_fraction" \
      --config scratch=conf/lora_trainer.yaml,conf/$model/adapt_scratch.yaml \
      --config pretrained=conf/lora_trainer.yaml,conf/$model/adapt_pretrained.yaml --train_args "$lora_args $adapt_args"
fi

if run 8; then
  log "Stage 8: decoding ($decode_config) and scoring"
  split_speakers "$nj" $work/decode/split >/dev/null
  # shellcheck disable=SC2086
  ${cuda_cmd} --gpu "$ngpu" ${gpu_share[@]+"${gpu_share[@]}"} JOB=1:"$nj" $work/decode/log/decode.JOB.log \
    python -m pqm_ext.bin.decode --exp_dir $exp --tag "$tag" --quant $quant --baselines $baselines \
      --data $dump/sa_test --speakers @$work/decode/split/spk.JOB --nutts $nutts --inits $inits \
      --decode_config "$decode_config" \
      --ngpu "$ngpu" --mixed_batch "$mixed_batch" --fold_adapters "$fold_adapters"
  python -m pqm_ext.bin.make_results --exp_dir $exp --tag "$tag" --quant $quant --baselines $baselines \
    --data $dump/sa_test --model $model --corpus "$corpus" --nutts $nutts --inits $inits --decode_config "$decode_config" \
    ${score_cleaner:+--score_cleaner "$score_cleaner"}
  log "RESULTS: $PWD/$work/RESULTS.md"
fi
log "finished stages $stage-$stop_stage in ${SECONDS}s"

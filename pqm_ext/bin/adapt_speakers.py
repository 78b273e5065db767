r"""Stage 7: speaker adaptive training — LoRA adapters per target speaker, N and initialisation.

One job handles the speakers given to it (the stage runs one job per speaker through
``${cuda_cmd} JOB=1:N``). Adapters made from the same inputs are skipped, others trained (again); if a
unit fails, the others still run and the job exits non-zero listing the failures.

Usage:
    python -m pqm_ext.bin.adapt_speakers --exp_dir exp/whisper --data dump/raw/sa_adapt \
        --splits data/sa_splits --speakers 1089 --nutts 5 10 20 --inits scratch pretrained \
        --config scratch=conf/lora_trainer.yaml,conf/whisper/adapt_scratch.yaml \
        --config pretrained=conf/lora_trainer.yaml,conf/whisper/adapt_pretrained.yaml
"""
from __future__ import annotations

import argparse
import shlex
import logging
import sys
from pathlib import Path

from pqm_ext.asr.adapt import INITS, adapt_speaker
from pqm_ext.asr.layout import add_tag_argument, layout_of
from pqm_ext.data.kaldi_dir import read_data_dir
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.cli import entry_point


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp_dir", required=True, help="exp/<model> (see pqm_ext.asr.layout)")
    p.add_argument("--quant", default="nf4", help="quantised base under exp_dir")
    add_tag_argument(p)
    p.add_argument("--data", required=True, help="formatted adaptation data dir (all target speakers)")
    p.add_argument("--splits", required=True, help="dir with <spk>.adapt files (utterances in adaptation order)")
    p.add_argument("--speakers", nargs="+", required=True, help="speaker ids, or @file with one per line")
    p.add_argument("--nutts", nargs="+", type=int, required=True)
    p.add_argument("--inits", nargs="+", choices=INITS, default=["scratch", "pretrained"])
    p.add_argument("--config", action="append", default=[], metavar="INIT=YAML[,YAML...]",
                   help="training YAML files per init, merged in order")
    p.add_argument("--pseudo_text", default=None, help="text file of pseudo-labels (init semi)")
    p.add_argument("--ngpu", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep_checkpoints", action="store_true")
    p.add_argument("--valid_fraction", type=float, default=0.0,
                   help="hold out this fraction of the N utterances (at least 1) and keep the epoch with the lowest "
                        "held-out loss (early stopping); 0: train on all N, keep the last epoch")
    p.add_argument("--train_args", default="", help="extra ESPnet trainer options, e.g. '--max_epoch 1'")
    return p


def speakers_of(values):
    out = []
    for v in values:
        if v.startswith("@"):
            if not Path(v[1:]).is_file():
                raise InputError(v[1:], "speaker list not found")
            out += [s.strip() for s in Path(v[1:]).read_text().split() if s.strip()]
        else:
            out.append(v)
    return out


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    layout = layout_of(a)
    if not 0 <= a.valid_fraction < 1:
        raise SystemExit(f"adapt_speakers: --valid_fraction must be in [0, 1), not {a.valid_fraction}")
    configs = dict(c.split("=", 1) for c in a.config)
    configs.setdefault("semi", configs.get("pretrained"))  # PQM on pseudo-labels trains like PQM
    missing = [i for i in a.inits if not configs.get(i)]
    if missing:
        raise SystemExit(f"adapt_speakers: no --config given for init(s) {missing}")
    data = read_data_dir(a.data)
    speakers = speakers_of(a.speakers)
    unknown = [s for s in speakers if s not in set(data.utt2spk.values())]
    if unknown:
        raise InputError(Path(a.data) / "utt2spk", f"unknown speaker(s) {unknown}: not in the adaptation data")
    failures = []
    for spk in speakers:
        failures += adapt_speaker(layout, spk, data, Path(a.splits), a.nutts, a.inits,
                                  {k: v.split(",") for k, v in configs.items()}, a.pseudo_text, a.ngpu, a.seed,
                                  a.keep_checkpoints, shlex.split(a.train_args), a.valid_fraction)
    if failures:
        logging.error("failed units:\n  %s", "\n  ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()

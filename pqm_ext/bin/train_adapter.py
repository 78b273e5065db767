r"""Stage 6: LoRA pretraining on the multi-speaker pool with the quantised base frozen.

Runs ESPnet's trainer (resumable: re-running continues from its checkpoint) and saves the adapter
in peft's format to ``<out>/adapter``. An adapter made from the same inputs is kept; one made from
other inputs (options, base, data, noise and RIR lists) is trained again. ``--check`` only says which: exit
status 0 if the adapter is current, 1 if training would run, 2 on bad input (the error names the file).

Usage:
    python -m pqm_ext.bin.train_adapter --model_dir exp/whisper/nf4 --train_config conf/lora_trainer.yaml conf/whisper/lora_pretrain.yaml \
        --train_data dump/raw/pretrain --valid_data dump/raw/dev --out exp/whisper/lora_pretrain
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from pqm_ext.asr.base_record import input_file
from pqm_ext.asr.model_io import MODEL_FILE
from pqm_ext.asr.train import data_args, is_current, train_adapter, training_plan
from pqm_ext.utils.cli import entry_point
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import unit_of_work


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="quantised base model directory")
    p.add_argument("--train_config", required=True, nargs="+",
                   help="YAML files merged in order: ESPnet trainer options, lora_conf, ...")
    p.add_argument("--train_data", required=True)
    p.add_argument("--valid_data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--init_adapter", default=None, help="start from this adapter directory")
    p.add_argument("--ngpu", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_args", default="", help="extra ESPnet trainer options, e.g. '--max_epoch 1'")
    p.add_argument("--check", action="store_true",
                   help="train nothing: exit 0 if the adapter is current, 1 if it would be trained, 2 on bad input")
    return p


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    if a.check:
        try:  # a missing input must not read as "would train": the job would fail in the queue, hours later
            input_file(Path(a.model_dir) / MODEL_FILE, "model file (the quantised base: stage 5)")
            data_args("train", a.train_data), data_args("valid", a.valid_data)
            _, made_from = training_plan(a.model_dir, a.train_config, a.train_data, a.valid_data, a.out,
                                         init_adapter=a.init_adapter, ngpu=a.ngpu, seed=a.seed,
                                         extra_args=shlex.split(a.train_args))
        except InputError as e:  # not "would train": the caller must not submit a job that fails the same way
            logging.error("%s", e)
            sys.exit(2)
        sys.exit(0 if is_current(a.out, made_from) else 1)
    with unit_of_work(a.out, "train"):
        train_adapter(a.model_dir, a.train_config, a.train_data, a.valid_data, a.out, init_adapter=a.init_adapter,
                      ngpu=a.ngpu, seed=a.seed, info={"stage": "lora_pretrain", "train_data": a.train_data},
                      extra_args=shlex.split(a.train_args))


if __name__ == "__main__":
    main()

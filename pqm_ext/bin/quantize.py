r"""Stage 5: quantise a full-precision model directory (NF4 / FP4 / uniform int-k) and report its size.

Writes ``<out>/model.safetensors`` (quantised checkpoint, reloadable bit-exactly without the
full-precision weights), ``<out>/config.yaml`` (the base's ESPnet config), and
``<out>/size_report.{txt,json}``, the base's ``bpe.model`` if it has one, and ``<out>/made_from.json``
(digests of the base and its config, the quantisation options): a re-run keeps a model made from the
same inputs and quantises again otherwise.

Usage:
    python -m pqm_ext.bin.quantize --model_dir exp/whisper/base --quant_config conf/quant_nf4.yaml \
        --out exp/whisper/nf4
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from pqm_ext.asr.config import read_yaml
from pqm_ext.asr.model_io import BPE_MODEL, MODEL_FILE, bundled_bpemodel, load_base
from pqm_ext.quant import QuantConfig, save_quantized, size_report, write_size_report
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import atomic_dir
from pqm_ext.utils.cli import entry_point
from pqm_ext.utils.provenance import canonical, file_digest, read_record, reusable

MADE_FROM = "made_from.json"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="full-precision model directory (config.yaml + model.safetensors)")
    p.add_argument("--quant_config", required=True, help="YAML with a quant_conf mapping (see QuantConfig)")
    p.add_argument("--out", required=True)
    return p


def quantize_dir(model_dir, quant_config, out) -> Path:
    from pqm_ext.tasks.pqm_asr import PQMASRTask

    model_dir, out = Path(model_dir), Path(out)
    conf = read_yaml(quant_config)
    unknown = set(conf) - {"quant_conf"}
    if unknown:
        raise InputError(quant_config, f"unknown key(s) {sorted(unknown)}; expected quant_conf")
    try:
        cfg = QuantConfig.from_dict(conf.get("quant_conf"))
    except (TypeError, ValueError) as e:
        raise InputError(quant_config, f"quant_conf: {e}") from e
    if not cfg.enabled:
        raise InputError(quant_config, f"method none leaves nothing to quantise (the base is {model_dir})")
    for name in (MODEL_FILE, "config.yaml"):
        if not (model_dir / name).is_file():
            raise InputError(model_dir / name, "not found: the full-precision model (stage 4) comes first")
    made_from = {"base": file_digest(model_dir / MODEL_FILE), "base_config": file_digest(model_dir / "config.yaml"),
                 "quant_conf": cfg.to_dict()}
    if (out / MODEL_FILE).is_file() and reusable(read_record(out / MADE_FROM), made_from, out):
        logging.info("%s exists, made from the same inputs: skipping", out)
        return out
    args = argparse.Namespace(**read_yaml(model_dir / "config.yaml"))
    args.quant_conf, args.lora_conf, args.base_model_file = {"method": "none"}, None, None
    model = PQMASRTask.build_model(args)
    try:
        load_base(model, model_dir / MODEL_FILE, cfg)
    except ValueError as e:  # what this config cannot do to this model (a value float16 cannot hold, ...)
        raise InputError(quant_config, f"{e} (quantising {model_dir / MODEL_FILE})") from e
    report = size_report(model, storage_dtype=cfg.storage_dtype)
    with atomic_dir(out, overwrite=True) as tmp:
        shutil.copy(model_dir / "config.yaml", tmp / "config.yaml")
        if bundled_bpemodel(model_dir):
            shutil.copy(model_dir / BPE_MODEL, tmp / BPE_MODEL)
        save_quantized(model, tmp / MODEL_FILE, cfg, extra={"source": str(model_dir / MODEL_FILE)})
        write_size_report(report, tmp)
        (tmp / MADE_FROM).write_text(json.dumps(canonical(made_from), indent=1))
    logging.info("%s: %s", out, report.to_text().splitlines()[-1])
    return out


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    quantize_dir(a.model_dir, a.quant_config, a.out)


if __name__ == "__main__":
    main()

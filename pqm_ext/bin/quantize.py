"""Stage 5: quantise a full-precision model directory (NF4 / FP4 / uniform int-k) and report its size.

Writes ``<out>/model.safetensors`` (quantised checkpoint, reloadable bit-exactly without the
full-precision weights), ``<out>/config.yaml`` (the base's ESPnet config), and
``<out>/size_report.{txt,json}``.

Usage:
    python -m pqm_ext.bin.quantize --model_dir exp/whisper/base --quant_config conf/quant_nf4.yaml \
        --out exp/whisper/nf4
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from pqm_ext.asr.config import read_yaml
from pqm_ext.asr.model_io import MODEL_FILE, load_base
from pqm_ext.quant import QuantConfig, save_quantized, size_report, write_size_report
from pqm_ext.utils.fileio import atomic_dir
from pqm_ext.utils.cli import entry_point


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
        raise ValueError(f"{quant_config}: unknown key(s) {sorted(unknown)}; expected quant_conf")
    cfg = QuantConfig.from_dict(conf.get("quant_conf"))
    if not cfg.enabled:
        raise ValueError(f"{quant_config}: method none leaves nothing to quantise (the base is {model_dir})")
    args = argparse.Namespace(**read_yaml(model_dir / "config.yaml"))
    args.quant_conf, args.lora_conf, args.base_model_file = {"method": "none"}, None, None
    model = PQMASRTask.build_model(args)
    load_base(model, model_dir / MODEL_FILE, cfg)
    report = size_report(model, storage_dtype=cfg.storage_dtype)
    with atomic_dir(out, overwrite=True) as tmp:
        shutil.copy(model_dir / "config.yaml", tmp / "config.yaml")
        save_quantized(model, tmp / MODEL_FILE, cfg, extra={"source": str(model_dir / MODEL_FILE)})
        write_size_report(report, tmp)
    logging.info("%s: %s", out, report.to_text().splitlines()[-1])
    return out


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    quantize_dir(a.model_dir, a.quant_config, a.out)


if __name__ == "__main__":
    main()

r"""Stage 4 for the Conformer: train the full-precision base with ESPnet, or import a trained one.

Training runs ESPnet's ASR trainer (through PQMASRTask, without quantisation or adapters) on the
pretraining pool in ``<out>_train`` and resumes from its checkpoint when re-run; the n-best
averaged model ESPnet writes is then exported to ``<out>`` (config.yaml + model.safetensors +
size report). ``--pretrained_model DIR`` imports an ESPnet model directory (config.yaml and a
``*.pth`` state dict, read with ``weights_only=True``), or a base this stage exported in another recipe
(config.yaml + model.safetensors), instead of training.

The sentencepiece model travels into ``<out>`` too: ESPnet's config names it by a path relative to
the recipe that trained it, and in another recipe that path may hold a different corpus' BPE model
(same file name, other pieces), which would turn every transcript into the wrong token ids.

The base records what it was made from (configs, token list, the pool's text, or the imported model's
files): a re-run with the same inputs skips, one with other inputs is refused rather than retraining over
hours of work, and an interrupted training is resumed only with the inputs it was started with
(pqm_ext.asr.base_record).

Usage:
    python -m pqm_ext.bin.train_base --config conf/conformer/model.yaml --train_config conf/conformer/train.yaml \
        --token_list data/token_list/bpe_unigram300/tokens.txt --bpemodel data/token_list/bpe_unigram300/bpe.model \
        --train_data dump/raw/pretrain --valid_data dump/raw/dev --out exp/conformer/base
"""
from __future__ import annotations

import argparse
import logging
import shlex
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
import yaml

from pqm_ext.asr.base_record import (base_is_current, check_resumed_training, config_digest, data_digest, input_file,
                                     write_base_record)
from pqm_ext.asr.config import dump_config, merge_configs, read_yaml
from pqm_ext.asr.model_io import BPE_MODEL, FP_FORMAT, MODEL_FILE, file_format, save_fp_model
from pqm_ext.asr.train import data_args
from pqm_ext.quant import size_report, write_size_report
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import atomic_dir
from pqm_ext.utils.provenance import file_digest
from pqm_ext.utils.cli import entry_point

MODEL_FILES = ("valid.acc.ave.pth", "valid.acc.best.pth", "valid.loss.ave.pth", "latest.pth")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="ESPnet model config")
    p.add_argument("--train_config", default=None, help="ESPnet trainer options merged over --config")
    p.add_argument("--token_list", required=True)
    p.add_argument("--bpemodel", default=None)
    p.add_argument("--train_data", required=True)
    p.add_argument("--valid_data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--pretrained_model", default="", help="ESPnet model dir to import instead of training")
    p.add_argument("--train_args", default="", help="extra ESPnet options, e.g. '--max_epoch 5'")
    p.add_argument("--ngpu", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1, help="CPU threads for this one training job")
    return p


def model_file_of(model_dir: Path) -> Path:
    for name in MODEL_FILES:
        if (model_dir / name).exists():
            return model_dir / name
    found = sorted(model_dir.glob("*.pth"))
    if not found and (model_dir / MODEL_FILE).is_file():  # a base exported by this stage
        return model_dir / MODEL_FILE
    if not found:
        raise InputError(model_dir, f"no model file (*.pth or {MODEL_FILE}) in the model directory "
                                    f"(looked for {MODEL_FILES})")
    return found[-1]


def read_state(weights: Path) -> dict:
    """The state dict of an ESPnet ``*.pth`` or of a base this stage exported (``model.safetensors``)."""
    from safetensors.torch import load_file

    exported = weights.name == MODEL_FILE
    if exported and (fmt := file_format(weights)) != FP_FORMAT:
        raise InputError(weights, f"not a full-precision base (format {fmt!r}; a quantised model cannot be "
                                  f"imported as one)")
    try:
        return load_file(str(weights)) if exported else torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or pickled-object files
        raise InputError(weights, f"cannot read the model file: {e}") from e


SPECIAL_TOKENS = {"<blank>", "<unk>", "<sos/eos>"}


def find_bpemodel(bpemodel: str, config: Path) -> Path:
    """The sentencepiece model a config names: relative paths are tried against the model directory
    and its parents first (the recipe that trained it), then the current directory. A base exported by
    this stage carries its own beside its config, wherever it was moved."""
    path = Path(bpemodel)
    own = [config.parent / BPE_MODEL] if path.name == BPE_MODEL else []
    candidates = own + ([path] if path.is_absolute() else
                        [d / path for d in [config.parent, *config.parent.resolve().parents]] + [Path.cwd() / path])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputError(config, f"bpemodel {bpemodel} not found next to the model or in {Path.cwd()}")


def check_bpemodel(bpemodel: Path, token_list, config: Path) -> None:
    """Refuse a sentencepiece model whose pieces do not cover the model's token list."""
    import sentencepiece as spm

    if isinstance(token_list, str):  # a token list file instead of ESPnet's inline list
        token_list = Path(token_list).read_text(encoding="utf-8").split()
    sp = spm.SentencePieceProcessor(model_file=str(bpemodel))
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    unknown = [t for t in token_list if t not in SPECIAL_TOKENS and t not in pieces]
    if unknown:
        raise InputError(config, f"bpemodel {bpemodel} does not match token_list: {len(unknown)} tokens are not "
                                 f"among its pieces (e.g. {unknown[:5]}); it belongs to another model")


def bundle_bpemodel(args: argparse.Namespace, config: Path, tmp: Path, out: Path) -> None:
    """Copy a BPE model's sentencepiece file into the base directory and point the config at it."""
    if getattr(args, "token_type", None) != "bpe" or not getattr(args, "bpemodel", None):
        return
    src = find_bpemodel(args.bpemodel, config)
    check_bpemodel(src, args.token_list, config)
    shutil.copy(src, tmp / BPE_MODEL)
    args.bpemodel = str(out / BPE_MODEL)


def export(train_dir: Path, out: Path, made_from: Optional[Dict] = None) -> Path:
    """Build the model from ESPnet's config.yaml, load its best weights, write the base directory."""
    from pqm_ext.tasks.pqm_asr import PQMASRTask

    config = train_dir / "config.yaml"
    args = argparse.Namespace(**read_yaml(config))
    args.quant_conf, args.lora_conf, args.base_model_file, args.init_adapter = {"method": "none"}, None, None, None
    model = PQMASRTask.build_model(args)
    weights = model_file_of(train_dir)
    state = read_state(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(weights, f"model file does not fit {config}: {e}") from e
    with atomic_dir(out, overwrite=True) as tmp:
        bundle_bpemodel(args, config, tmp, out)
        save_fp_model(model, tmp / MODEL_FILE, extra={"source": str(weights)})
        dump_config(args, tmp / "config.yaml")
        write_size_report(size_report(model, method="fp32", storage_dtype="float32"), tmp)
        if made_from is not None:
            write_base_record(tmp, made_from)
    logging.info("wrote %s from %s", out, weights)
    return out


def train_dir_of(out) -> Path:
    return Path(str(out) + "_train")


def training_inputs(a) -> Dict:
    """What a trained base is made from. Left out: --ngpu and threads (they change no result), and ESPnet
    trainer options (--train_args), which are how a training is extended or finished (--max_epoch)."""
    return {"config": config_digest(a.config), "train_config": config_digest(a.train_config) if a.train_config else None,
            "token_list": file_digest(input_file(a.token_list, "token list")),
            "bpemodel": file_digest(a.bpemodel) if a.bpemodel and Path(a.bpemodel).is_file() else None,
            "train_data": data_digest(a.train_data), "valid_data": data_digest(a.valid_data), "seed": a.seed}


def train(a, made_from: Dict) -> Path:
    from pqm_ext.tasks.pqm_asr import PQMASRTask

    train_dir = train_dir_of(a.out)
    check_resumed_training(train_dir, made_from)
    conf = merge_configs([a.config] + ([a.train_config] if a.train_config else []),
                         {"token_list": a.token_list, "bpemodel": a.bpemodel, "output_dir": str(train_dir),
                          "ngpu": a.ngpu, "seed": a.seed, "resume": True})
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "train_input.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    cmd = ["--config", str(train_dir / "train_input.yaml")] + data_args("train", a.train_data) \
        + data_args("valid", a.valid_data) + shlex.split(a.train_args)
    PQMASRTask.main(cmd=cmd)
    return export(train_dir, Path(a.out), made_from)


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    torch.set_num_threads(a.num_threads)
    if a.pretrained_model:
        src = Path(a.pretrained_model)
        if not (src / "config.yaml").is_file():
            raise InputError(src / "config.yaml", "not an ESPnet model directory (config.yaml missing)")
        if "whisper" in str(read_yaml(src / "config.yaml").get("encoder", "")):
            raise InputError(src / "config.yaml", "a Whisper model: it is --model whisper's base, not a Conformer's")
        made_from = {"pretrained_model": {"config": config_digest(src / "config.yaml"),
                                          "model": file_digest(model_file_of(src))}}
        if base_is_current(a.out, made_from, unrecorded_ok=False):
            logging.info("%s exists, made from the same inputs: skipping", a.out)
        else:
            export(src, Path(a.out), made_from)
    else:
        made_from = training_inputs(a)
        if base_is_current(a.out, made_from, also_move=[train_dir_of(a.out)]):
            logging.info("%s exists, made from the same inputs: skipping", a.out)
        else:
            train(a, made_from)


if __name__ == "__main__":
    main()

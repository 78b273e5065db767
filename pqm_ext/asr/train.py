"""Run ESPnet's trainer on a PQM system and keep the result as a peft adapter directory.

The stage's YAML files (shared trainer options, then optimiser, epochs, batch, ``lora_conf``) are
merged over the base model's ``config.yaml``; ESPnet's parser rejects unknown keys. ESPnet writes checkpoints into
``<out>/train`` and resumes from them when re-run; when training ends its trainer saves the adapter
to ``<out>/adapter`` (atomically) with a record of what it was made from. An adapter made from the same
inputs marks the unit of work as done; one made from other inputs (a changed option, a new base, another
initial adapter, other data, other noise or RIR files: pqm_ext.asr.augment) is trained again.
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from pqm_ext.asr.augment import AUGMENT_LISTS, augment_record
from pqm_ext.asr.config import merge_configs, read_yaml
from pqm_ext.asr.model_io import MODEL_FILE, bundled_bpemodel
from pqm_ext.lora.config import AdapterConfig
from pqm_ext.lora.io import WEIGHTS, adapter_info
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import write_text_atomic
from pqm_ext.utils.provenance import canonical, file_digest, files_digest, read_record, reusable

logger = logging.getLogger(__name__)
ADAPTER = "adapter"
MADE_FROM = "made_from.json"
DATA_FILES = ("wav.scp", "text", "utt2num_samples")


def data_args(split: str, data_dir: Path) -> List[str]:
    data_dir = Path(data_dir)
    for name in DATA_FILES:
        if not (data_dir / name).is_file():
            raise InputError(data_dir / name, "missing (run the data formatting stage first)")
    return [f"--{split}_data_path_and_name_and_type", f"{data_dir}/wav.scp,speech,sound",
            f"--{split}_data_path_and_name_and_type", f"{data_dir}/text,text,text",
            f"--{split}_shape_file", f"{data_dir}/utt2num_samples"]


def training_plan(model_dir, train_config, train_data, valid_data, out_dir, *, init_adapter: Optional[str] = None,
                  ngpu: int = 0, seed: int = 0, overrides: Optional[Dict] = None,
                  extra_args: Optional[List[str]] = None) -> Tuple[Dict, Dict]:
    """(the ESPnet config to train with, what the adapter is made from): the base's config.yaml with the
    stage's YAML files merged over it; the base, the config, the trainer options, the initial adapter and the
    data (digests), which decide whether an existing adapter is reused (``pqm_ext.utils.provenance``)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    train_configs = [train_config] if isinstance(train_config, (str, Path)) else list(train_config)
    base_conf, stage_conf = read_yaml(model_dir / "config.yaml"), merge_configs(train_configs, overrides)
    for key in AUGMENT_LISTS:  # a base trained with noise keeps it to itself: only the stage's own options turn
        if base_conf.get(key):  # augmentation on (stage 6, never stage 7); ESPnet writes null when there was none
            base_conf[key] = None
    conf = merge_configs([base_conf, stage_conf])
    # The options of another optimiser or scheduler class than the base's do not belong to it (the base's
    # warmuplr warmup_steps would reach a step scheduler, or no scheduler at all): they come from the stage alone.
    for name in ("optim", "scheduler"):
        if name in stage_conf and stage_conf[name] != base_conf.get(name):
            conf[f"{name}_conf"] = dict(stage_conf.get(f"{name}_conf") or {})
    if not conf.get("lora_conf"):
        raise InputError(train_configs[-1], "lora_conf is missing: the stage trains a LoRA adapter")
    try:  # checked here, where the file can still be named, not deep inside ESPnet's model building
        AdapterConfig.from_dict(conf["lora_conf"])
    except (TypeError, ValueError) as e:
        defining = [p for p in train_configs if "lora_conf" in read_yaml(p)]
        raise InputError(defining[-1] if defining else train_configs[-1], f"lora_conf: {e}") from e
    conf.update(base_model_file=str(model_dir / MODEL_FILE), init_adapter=init_adapter, seed=seed,
                output_dir=str(out_dir / "train"), ngpu=ngpu, resume=True, adapter_out=str(out_dir / ADAPTER))
    # A base trained by ESPnet (stage 4's Conformer) carries its own data and ESPnet's bookkeeping
    # (version, distributed) in config.yaml: not options of this training.
    for key in ("config", "required", "version", "distributed", "train_data_path_and_name_and_type",
                "valid_data_path_and_name_and_type", "train_shape_file", "valid_shape_file"):
        conf.pop(key, None)
    bpemodel = bundled_bpemodel(model_dir)
    if bpemodel:
        conf["bpemodel"] = bpemodel
    if init_adapter and not (Path(init_adapter) / WEIGHTS).is_file():
        raise InputError(Path(init_adapter) / WEIGHTS, "initial adapter not found (the pretrained LoRA: stage 6)")
    made_from = {"base": file_digest(model_dir / MODEL_FILE),
                 "config": {k: v for k, v in conf.items() if k != "ngpu"},  # the device does not change the adapter
                 "train_args": list(extra_args or []),
                 "init_adapter": file_digest(Path(init_adapter) / WEIGHTS) if init_adapter else None,
                 "train_data": files_digest(Path(train_data) / n for n in DATA_FILES),
                 "valid_data": files_digest(Path(valid_data) / n for n in DATA_FILES)}
    augment = augment_record(conf, extra_args or [])
    if augment:  # absent when there is none, so adapters recorded before augmentation existed stay current
        made_from["augment"] = augment
    return conf, made_from


def is_current(out_dir, made_from: Dict) -> bool:
    """Whether ``<out_dir>/adapter`` exists and was made from ``made_from``."""
    adapter_dir = Path(out_dir) / ADAPTER
    if not (adapter_dir / WEIGHTS).is_file():
        return False
    return reusable(adapter_info(adapter_dir).get("made_from"), made_from, adapter_dir)


def train_adapter(model_dir, train_config, train_data, valid_data, out_dir, *, init_adapter: Optional[str] = None,
                  ngpu: int = 0, seed: int = 0, overrides: Optional[Dict] = None,
                  extra_args: Optional[List[str]] = None, info: Optional[Dict] = None,
                  keep_checkpoints: bool = True) -> Path:
    """Train one LoRA adapter on a frozen base, unless it exists made from the same inputs; return
    ``<out_dir>/adapter``. ``keep_checkpoints=False`` deletes ESPnet's checkpoints once it is saved."""
    from pqm_ext.tasks.pqm_asr import PQMASRTask

    out_dir = Path(out_dir)
    conf, made_from = training_plan(model_dir, train_config, train_data, valid_data, out_dir,
                                    init_adapter=init_adapter, ngpu=ngpu, seed=seed, overrides=overrides,
                                    extra_args=extra_args)
    adapter_dir = out_dir / ADAPTER
    if is_current(out_dir, made_from):
        logger.info("%s exists, made from the same inputs: skipping", adapter_dir)
        return adapter_dir
    conf["adapter_info"] = dict(info or {}, made_from=made_from)
    train_dir = out_dir / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    discard_unreadable_checkpoint(train_dir)
    discard_checkpoint_of_other_inputs(train_dir, made_from)
    merged = train_dir / "train_input.yaml"
    merged.write_text(yaml.safe_dump(conf, sort_keys=False))
    cmd = ["--config", str(merged)] + data_args("train", train_data) + data_args("valid", valid_data)
    PQMASRTask.main(cmd=cmd + list(extra_args or []))  # its trainer saves the adapter when done
    if not (adapter_dir / WEIGHTS).is_file():
        raise RuntimeError(f"training finished without writing {adapter_dir}")
    if not keep_checkpoints:
        for ckpt in train_dir.glob("*.pth"):
            ckpt.unlink()
    return adapter_dir


def discard_checkpoint_of_other_inputs(train_dir: Path, made_from: Dict) -> None:
    """ESPnet resumes from ``checkpoint.pth`` with the optimiser state it saved (learning rate included): a
    checkpoint of a run with other inputs would silently continue that run. Record the inputs; drop such one."""
    record = train_dir / MADE_FROM
    if (train_dir / "checkpoint.pth").exists():
        if not reusable(read_record(record), made_from, train_dir / "checkpoint.pth"):
            for p in train_dir.glob("*.pth"):
                p.unlink()
    write_text_atomic(record, json.dumps(canonical(made_from), indent=1))


def discard_unreadable_checkpoint(train_dir: Path) -> None:
    """A job killed while ESPnet wrote ``checkpoint.pth`` leaves it truncated; resume would crash.

    ESPnet reseeds every epoch (seed + epoch), so restarting from the last whole epoch, or from
    scratch, gives the same adapter as an uninterrupted run.
    """
    ckpt = train_dir / "checkpoint.pth"
    if not ckpt.exists():
        return
    try:  # torch.save writes a zip archive: check it whole (CRCs) without unpickling anything
        with zipfile.ZipFile(ckpt) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        bad = str(e)
    if bad is not None:
        logger.warning("%s is damaged (%s): training this unit again from the start", ckpt, bad)
        for p in train_dir.glob("*.pth"):
            p.unlink()

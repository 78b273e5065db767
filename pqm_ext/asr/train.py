"""Run ESPnet's trainer on a PQM system and keep the result as a peft adapter directory.

The stage's YAML files (shared trainer options, then optimiser, epochs, batch, ``lora_conf``) are
merged over the base model's ``config.yaml``; ESPnet's parser rejects unknown keys. ESPnet writes checkpoints into
``<out>/train`` and resumes from them when re-run; when training ends its trainer saves the adapter
to ``<out>/adapter`` (atomically), which is what marks the unit of work as done.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from pqm_ext.asr.config import merge_configs
from pqm_ext.asr.model_io import MODEL_FILE
from pqm_ext.utils.errors import InputError

logger = logging.getLogger(__name__)
ADAPTER = "adapter"


def data_args(split: str, data_dir: Path) -> List[str]:
    data_dir = Path(data_dir)
    for name in ("wav.scp", "text", "utt2num_samples"):
        if not (data_dir / name).is_file():
            raise InputError(data_dir / name, "missing (run the data formatting stage first)")
    return [f"--{split}_data_path_and_name_and_type", f"{data_dir}/wav.scp,speech,sound",
            f"--{split}_data_path_and_name_and_type", f"{data_dir}/text,text,text",
            f"--{split}_shape_file", f"{data_dir}/utt2num_samples"]


def train_adapter(model_dir, train_config, train_data, valid_data, out_dir, *, init_adapter: Optional[str] = None,
                  ngpu: int = 0, seed: int = 0, overrides: Optional[Dict] = None,
                  extra_args: Optional[List[str]] = None, info: Optional[Dict] = None) -> Path:
    """Train one LoRA adapter on a frozen base; return ``<out_dir>/adapter``."""
    from pqm_ext.tasks.pqm_asr import PQMASRTask

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    adapter_dir = out_dir / ADAPTER
    if (adapter_dir / "adapter_model.safetensors").is_file():
        logger.info("%s exists: skipping", adapter_dir)
        return adapter_dir
    train_configs = [train_config] if isinstance(train_config, (str, Path)) else list(train_config)
    conf = merge_configs([model_dir / "config.yaml"] + train_configs, overrides)
    if not conf.get("lora_conf"):
        raise InputError(train_configs[-1], "lora_conf is missing: the stage trains a LoRA adapter")
    conf.update(base_model_file=str(model_dir / MODEL_FILE), init_adapter=init_adapter, seed=seed,
                output_dir=str(out_dir / "train"), ngpu=ngpu, resume=True, adapter_out=str(adapter_dir),
                adapter_info=info or {})
    # A base trained by ESPnet (stage 4's Conformer) carries its own data and ESPnet's bookkeeping
    # (version, distributed) in config.yaml: not options of this training.
    for key in ("config", "required", "version", "distributed", "train_data_path_and_name_and_type",
                "valid_data_path_and_name_and_type", "train_shape_file", "valid_shape_file"):
        conf.pop(key, None)
    train_dir = out_dir / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    discard_unreadable_checkpoint(train_dir)
    merged = train_dir / "train_input.yaml"
    merged.write_text(yaml.safe_dump(conf, sort_keys=False))
    cmd = ["--config", str(merged)] + data_args("train", train_data) + data_args("valid", valid_data)
    PQMASRTask.main(cmd=cmd + list(extra_args or []))  # its trainer saves the adapter when done
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"training finished without writing {adapter_dir}")
    return adapter_dir


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

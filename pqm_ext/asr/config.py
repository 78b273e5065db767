"""Resolved ESPnet configs: YAML in, ESPnet's parser (which rejects unknown keys) in the middle.

Each model directory keeps the fully resolved ``config.yaml`` (ESPnet's convention) plus the
library versions and git revision that produced it, so inference rebuilds from it alone.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from pqm_ext.utils.errors import InputError

LIBRARIES = ("torch", "torchaudio", "espnet", "bitsandbytes", "peft", "openai-whisper", "sentencepiece", "jiwer")


def read_yaml(path) -> Dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise InputError(path, f"invalid YAML: {e}", line=None if line is None else line + 1) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(path, "a config must be a mapping of option: value")
    return data


def merge_configs(paths: List, overrides: Optional[Dict] = None) -> Dict:
    """Later files (or mappings already read) override earlier ones key by key; ``*_conf`` mappings merge
    one level deep."""
    out: Dict = {}
    for d in [p if isinstance(p, dict) else read_yaml(p) for p in paths] + [overrides or {}]:
        for k, v in d.items():
            if k.endswith("_conf") and isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = v
    return out


def parse_task_args(task, config: Dict, tmp_yaml: Path, extra: Optional[List[str]] = None,
                    source: Optional[Path] = None) -> argparse.Namespace:
    """Resolve ``config`` through the task's parser (unknown keys are errors, types are checked). A refusal
    names ``source``, the user's file that ``config`` was read from, if given (``tmp_yaml`` may be gone)."""
    tmp_yaml.parent.mkdir(parents=True, exist_ok=True)
    tmp_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        return task.get_parser().parse_args(["--config", str(tmp_yaml)] + list(extra or []))
    except SystemExit as e:
        raise InputError(source or tmp_yaml,
                         "the configuration was rejected by ESPnet's parser (see the message above)") from e


def provenance() -> Dict[str, str]:
    info = {}
    for lib in LIBRARIES:
        try:
            info[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            info[lib] = "not installed"
    try:
        root = Path(__file__).resolve().parents[2]
        info["pqm_git_sha"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["pqm_git_sha"] = "unknown"
    return info


def dump_config(args: argparse.Namespace, path) -> None:
    """Write ESPnet's config.yaml (all resolved options) and a provenance.yaml beside it."""
    from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        yaml_no_alias_safe_dump(vars(args), f, indent=4, sort_keys=False)
    with (path.parent / "provenance.yaml").open("w", encoding="utf-8") as f:
        yaml.safe_dump(provenance(), f)

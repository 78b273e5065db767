"""Shared helpers and fixtures for the data tests: tiny demo corpora synthesised with the real TTS voices.

A corpus is built once per test session (the synthesiser skips a complete output directory), so every
test module that imports the fixtures shares it. Tests copy a tree before corrupting it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Optional

import pytest

from pqm_ext.demo.synth import DemoConfig, synth_demo_corpus

REPO = Path(__file__).resolve().parents[1]
DATA_SH = {"librispeech": REPO / "egs/librispeech_sa/local/data.sh",
           "tedlium3": REPO / "egs/tedlium3_sa/local/data.sh"}
OUTPUTS = ("pretrain", "dev", "sa_adapt", "sa_test", "sa_splits")

# 3 targets x (4 + 3), 2 pool x 3, 1 dev x 2 (+ 1 TED-LIUM test talk x 2): about 30 utterances.
TINY = dict(num_target_speakers=3, num_pool_speakers=2, adapt_per_speaker=4, test_per_speaker=3,
            pool_per_speaker=3, dev_speakers=1, dev_per_speaker=2)
TINY_SEED = 7
# data.sh options for the tiny corpora: 2 of the 3 targets, 4 adaptation + 3 test utterances each.
SPLIT_ARGS = ["--num_target_speakers", "2", "--max_adapt", "4", "--num_test", "3"]


def tiny_config(layout: str, seed: int = TINY_SEED) -> DemoConfig:
    return DemoConfig(layout=layout, seed=seed, **TINY)


def synth_tiny(layout: str, out: Path, seed: int = TINY_SEED) -> Path:
    return synth_demo_corpus(tiny_config(layout, seed), out, nj=2)


def tree_digest(root: Path, exclude: Iterable[str] = (".synth_done.yaml",)) -> str:
    """sha256 over every file's relative path and bytes (names in ``exclude`` skipped)."""
    h = hashlib.sha256()
    exclude = set(exclude)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def run_data_sh(layout: str, cwd: Path, *args: str, corpus: Optional[Path] = None,
                env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run a recipe's local/data.sh with this interpreter's bin dir first on PATH."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("LIBRISPEECH", "TEDLIUM3")}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env["PYTHONPATH"] = f"{REPO}{os.pathsep}{full_env.get('PYTHONPATH', '')}"
    full_env.update(env or {})
    cmd: List[str] = ["bash", str(DATA_SH[layout])] + (["--corpus", str(corpus)] if corpus else []) + list(args)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120)


def assert_no_outputs(data_dir: Path) -> None:
    """A failed preparation leaves no data dir and no temporary directory behind."""
    if data_dir.exists():
        left = sorted(p.name for p in data_dir.iterdir())
        assert not left, f"{data_dir} has leftovers: {left}"


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_kv(path: Path) -> dict:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        k, _, v = line.partition(" ")
        out[k] = v
    return out


@pytest.fixture(scope="session")
def librispeech_tree(tmp_path_factory) -> Path:
    """A tiny demo corpus in the LibriSpeech layout (read-only: copy before changing it)."""
    return synth_tiny("librispeech", tmp_path_factory.getbasetemp() / "tiny_librispeech")


@pytest.fixture(scope="session")
def tedlium_tree(tmp_path_factory) -> Path:
    """A tiny demo corpus in the TED-LIUM 3 layout (read-only: copy before changing it)."""
    return synth_tiny("tedlium3", tmp_path_factory.getbasetemp() / "tiny_tedlium3")

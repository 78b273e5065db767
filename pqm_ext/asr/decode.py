"""Decode target speakers' test utterances with every system, one speaker file at a time.

Each (system, speaker) writes ``decode/<system>/hyp/<spk>.txt`` atomically, with the audio
duration and decoding time in ``<spk>.json``; existing files are skipped, so an interrupted job
resumes where it stopped. A speaker whose adapter is missing is reported and the others go on.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tqdm import tqdm

from pqm_ext.asr.layout import System
from pqm_ext.data.audio import read_audio
from pqm_ext.data.kaldi_dir import DataDir
from pqm_ext.lora import adapter_config_of
from pqm_ext.utils.fileio import write_text_atomic

logger = logging.getLogger(__name__)


def hyp_file(decode_dir: Path, spk: str) -> Path:
    return Path(decode_dir) / "hyp" / f"{spk}.txt"


def decode_systems(systems: Sequence[System], data: DataDir, speakers: Sequence[str], decode_root: Path,
                   decode_conf: Dict, device: str = "cpu") -> List[str]:
    """Decode ``speakers`` with each system; return the failures as ``system/speaker: reason``."""
    from pqm_ext.asr.recognizer import Recognizer

    spk2utt = data.spk2utt()
    failures = []
    for system in systems:
        todo = [s for s in speakers if not hyp_file(decode_root / system.name, s).is_file()]
        if not todo:
            continue
        missing = [s for s in todo if system.adapter and not (system.adapter_for(s) / "adapter_model.safetensors").is_file()]
        failures += [f"{system.name}/{s}: adapter {system.adapter_for(s)} not found" for s in missing]
        todo = [s for s in todo if s not in missing]
        if not todo:
            continue
        adapter_cfg = adapter_config_of(system.adapter_for(todo[0])) if system.adapter else None
        rec = Recognizer(system.model_dir, decode_conf, device=device, adapter=adapter_cfg)
        for spk in todo:
            if system.adapter:
                rec.use_adapter(system.adapter_for(spk))
            hyps, audio_s, t0 = {}, 0.0, time.perf_counter()
            for utt in tqdm(spk2utt[spk], desc=f"{system.name} {spk}", mininterval=10):
                speech, rate = read_audio(data.wav_scp[utt])
                audio_s += len(speech) / rate
                hyps[utt] = rec(speech).strip()
            elapsed = time.perf_counter() - t0
            out = hyp_file(decode_root / system.name, spk)
            write_text_atomic(out.with_suffix(".json"), json.dumps(
                {"utts": len(hyps), "audio_s": audio_s, "decode_s": elapsed, "device": device,
                 "adapter": str(system.adapter_for(spk) or ""), "decode_conf": decode_conf}))
            write_text_atomic(out, "".join(f"{u} {h}\n" for u, h in sorted(hyps.items())))
            logger.info("%s %s: %d utts, RTF %.3f", system.name, spk, len(hyps), elapsed / max(audio_s, 1e-9))
    return failures

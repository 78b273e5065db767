"""Decode target speakers' test utterances with every system, one speaker file at a time.

Each (system, speaker) writes ``decode/<system>/hyp/<spk>.txt`` atomically, with the audio
duration, decoding time and what it was made from (model, adapter, test utterances, decoding options)
in ``<spk>.json``. A re-run skips the files made from the same inputs, so an interrupted job resumes
where it stopped, and decodes again those whose inputs changed (``pqm_ext.utils.provenance``). A
speaker whose adapter is missing is reported and the others go on.

Because the record names the inputs by their digests, hypotheses made from the same inputs elsewhere
are the same hypotheses: a tagged variant (``--tag``) copies the default table's fp, quantised and,
when it shares the pretrained LoRA, lora_pretrained decodes instead of decoding them again.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from pqm_ext.asr.layout import System
from pqm_ext.asr.model_io import MODEL_FILE
from pqm_ext.data.audio import read_audio
from pqm_ext.data.kaldi_dir import DataDir
from pqm_ext.lora import adapter_config_of
from pqm_ext.lora.io import WEIGHTS
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import write_text_atomic
from pqm_ext.utils.provenance import canonical, file_digest, lines_digest, read_record, reusable

logger = logging.getLogger(__name__)


def hyp_file(decode_dir: Path, spk: str) -> Path:
    return Path(decode_dir) / "hyp" / f"{spk}.txt"


def write_hypotheses(out: Path, text: str, record: Dict) -> None:
    """The old record goes first, then the hypotheses, then the record that vouches for them: a run killed
    on the way leaves no record, so the speaker is decoded again, and no reader (a re-run, a tagged
    variant copying them) can take new hypotheses for the ones an old record describes."""
    out.with_suffix(".json").unlink(missing_ok=True)
    write_text_atomic(out, text)
    write_text_atomic(out.with_suffix(".json"), json.dumps(record))


def decode_inputs(system: System, spk: str, data: DataDir, utts: Sequence[str], decode_conf: Dict,
                  mixed_batch: int = 0, fold_adapters: bool = True) -> Dict:
    """What the hypotheses of ``spk`` by ``system`` are made from; recorded in ``<spk>.json``."""
    adapter = system.adapter_for(spk)
    return {"model": file_digest(Path(system.model_dir) / MODEL_FILE),
            "adapter": file_digest(adapter / WEIGHTS) if adapter else None,
            "test_utts": lines_digest(f"{u} {data.wav_scp[u]}" for u in utts),
            "decode_conf": decode_conf, "mixed_batch": mixed_batch,
            "fold_adapters": bool(fold_adapters) if adapter and not mixed_batch else None}


def copy_decoded(system: System, spk: str, wanted: Dict, donors: Sequence[Path], out: Path) -> Optional[Path]:
    """Copy ``spk``'s hypotheses by ``system`` from the first of the ``donors`` decode roots that holds them
    made from the same inputs (``wanted``); return where they came from, or None."""
    for root in donors:
        src = hyp_file(Path(root) / system.name, spk)
        record = read_record(src.with_suffix(".json"))
        if not (src.is_file() and src.resolve() != out.resolve() and isinstance(record, dict)
                and canonical(record.get("made_from")) == canonical(wanted)):
            continue
        text = src.read_text(encoding="utf-8")
        # the donor's record again: a decode of the donor that began meanwhile removed it before its text
        # (write_hypotheses), so an unchanged record vouches for the text read
        if read_record(src.with_suffix(".json")) == record:
            write_hypotheses(out, text, record)
            return src
    return None


def todo_speakers(system: System, data: DataDir, speakers: Sequence[str], decode_root: Path, decode_conf: Dict,
                  mixed_batch: int = 0, fold_adapters: bool = True, donors: Sequence[Path] = ()):
    """(speakers to decode with their inputs, failures): a speaker is decoded unless its hypotheses were made
    from the same inputs, here or in one of the ``donors`` decode roots (then they are copied); one whose
    adapter is missing is a failure."""
    spk2utt = data.spk2utt()
    missing = [s for s in speakers if system.adapter and not (system.adapter_for(s) / WEIGHTS).is_file()]
    failures = [f"{system.name}/{s}: adapter {system.adapter_for(s)} not found" for s in missing]
    todo, copied = {}, {}
    for spk in (s for s in speakers if s not in missing):
        wanted = decode_inputs(system, spk, data, spk2utt[spk], decode_conf, mixed_batch, fold_adapters)
        out = hyp_file(decode_root / system.name, spk)
        if out.is_file() and reusable(read_record(out.with_suffix(".json"), "made_from"), wanted, out):
            continue
        source = copy_decoded(system, spk, wanted, donors, out)
        if source is None:
            todo[spk] = wanted
        else:
            copied[spk] = source.parent.parent
    if copied:
        logger.info("%s: copied the hypotheses of %d speaker(s) from %s (made from the same model, adapter, test "
                    "utterances and decoding options)", system.name, len(copied),
                    ", ".join(sorted({str(d) for d in copied.values()})))
    return todo, failures


SAMPLE_RATE = 16000  # the models' frontends (ESPnet's fbank, Whisper's log-mel) take 16 kHz and do not resample


def read_speech(path) -> np.ndarray:
    """One test utterance's samples, refused unless at 16 kHz: the frontends would read any rate as 16 kHz."""
    speech, rate = read_audio(path)
    if rate != SAMPLE_RATE:
        raise InputError(path, f"sampled at {rate} Hz; the models take {SAMPLE_RATE} Hz (stage 2 resamples: decode "
                               "its dump/raw data dir)")
    return speech


def decode_systems(systems: Sequence[System], data: DataDir, speakers: Sequence[str], decode_root: Path,
                   decode_conf: Dict, device: str = "cpu", mixed_batch: int = 0,
                   fold_adapters: bool = True, donors: Sequence[Path] = ()) -> List[str]:
    """Decode ``speakers`` with each system; return the failures as ``system/speaker: reason``.

    ``fold_adapters``: decode each speaker with the adapter folded into the weights
    (``Recognizer.speaker``), else with peft's unmerged LoRA.

    ``mixed_batch`` > 0: greedy decoding in batches of that many utterances, taken from different
    speakers in turn, each with its own speaker's adapter (``pqm_ext.asr.batch_decode``); for Whisper the
    hypotheses are those of one-at-a-time greedy decoding, for a Conformer nearly so (its convolution
    modules see the batch's padding). The decoding config must be greedy.

    ``donors``: other decode roots whose hypotheses made from the same inputs are copied, not decoded again.
    """
    from pqm_ext.asr.recognizer import Recognizer

    if mixed_batch > 0:
        return _decode_systems_mixed(systems, data, speakers, decode_root, decode_conf, device, mixed_batch,
                                      donors)

    spk2utt = data.spk2utt()
    failures = []
    for system in systems:
        todo, missing = todo_speakers(system, data, speakers, decode_root, decode_conf,
                                      fold_adapters=fold_adapters, donors=donors)
        failures += missing
        if not todo:
            continue
        adapter_cfg = adapter_config_of(system.adapter_for(next(iter(todo)))) if system.adapter else None
        rec = Recognizer(system.model_dir, decode_conf, device=device, adapter=adapter_cfg)
        for spk in todo:
            hyps, audio_s, t0 = {}, 0.0, time.perf_counter()
            with rec.speaker(system.adapter_for(spk), fold=fold_adapters):  # None: the base alone
                for utt in tqdm(spk2utt[spk], desc=f"{system.name} {spk}", mininterval=10):
                    speech = read_speech(data.wav_scp[utt])
                    audio_s += len(speech) / SAMPLE_RATE
                    hyps[utt] = rec(speech).strip()
            elapsed = time.perf_counter() - t0
            write_hypotheses(hyp_file(decode_root / system.name, spk),
                             "".join(f"{u} {h}\n" for u, h in sorted(hyps.items())),
                             {"utts": len(hyps), "audio_s": audio_s, "decode_s": elapsed, "device": device,
                              "adapter": str(system.adapter_for(spk) or ""),
                              "adapter_folded": bool(system.adapter and fold_adapters),
                              "decode_conf": decode_conf, "made_from": todo[spk]})
            logger.info("%s %s: %d utts, RTF %.3f", system.name, spk, len(hyps), elapsed / max(audio_s, 1e-9))
    return failures


def _interleave(spk2utt: Dict[str, List[str]], speakers: Sequence[str]) -> List[str]:
    """Utterances taken from the speakers in turn, so consecutive utterances are different speakers'."""
    queues = [list(spk2utt[s]) for s in speakers]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def _decode_systems_mixed(systems: Sequence[System], data: DataDir, speakers: Sequence[str], decode_root: Path,
                          decode_conf: Dict, device: str, batch_size: int,
                          donors: Sequence[Path] = ()) -> List[str]:
    from pqm_ext.asr.batch_decode import batch_decode, check_greedy
    from pqm_ext.asr.recognizer import Recognizer
    from pqm_ext.lora.mixed import load_adapters

    spk2utt = data.spk2utt()
    failures = []
    for system in systems:
        todo, missing = todo_speakers(system, data, speakers, decode_root, decode_conf, mixed_batch=batch_size,
                                      donors=donors)
        failures += missing
        if not todo:
            continue
        rec = Recognizer(system.model_dir, decode_conf, device=device)
        check_greedy(rec.s2t)
        mixed = None
        if system.adapter:
            # one adapter per speaker, or one shared by all (lora_pretrained): loaded once each
            dirs = sorted({str(system.adapter_for(s)) for s in todo})
            mixed = load_adapters(rec.model, {f"a{i}": d for i, d in enumerate(dirs)})
            name_of = {d: f"a{i}" for i, d in enumerate(dirs)}
        utts = _interleave(spk2utt, todo)
        utt2spk = data.utt2spk
        speech, audio = [], {}
        for utt in utts:
            wav = read_speech(data.wav_scp[utt])
            speech.append(wav)
            audio[utt] = len(wav) / SAMPLE_RATE
        names = [name_of[str(system.adapter_for(utt2spk[u]))] for u in utts] if mixed else None
        t0 = time.perf_counter()
        texts = batch_decode(rec, speech, adapter_names=names, mixed=mixed, batch_size=batch_size)
        elapsed = time.perf_counter() - t0
        total_audio = sum(audio.values())
        hyps = dict(zip(utts, (t.strip() for t in texts)))
        for spk in todo:
            mine = spk2utt[spk]
            audio_s = sum(audio[u] for u in mine)
            write_hypotheses(hyp_file(decode_root / system.name, spk),
                             "".join(f"{u} {hyps[u]}\n" for u in sorted(mine)),
                             {"utts": len(mine), "audio_s": audio_s,
                              "decode_s": elapsed * audio_s / max(total_audio, 1e-9), "device": device,
                              "adapter": str(system.adapter_for(spk) or ""), "decode_conf": decode_conf,
                              "mixed_batch": batch_size, "batch_decode_s": elapsed, "batch_audio_s": total_audio,
                              "made_from": todo[spk]})
        logger.info("%s: %d speakers, %d utts in mixed batches of %d, RTF %.3f", system.name, len(todo), len(utts),
                    batch_size, elapsed / max(total_audio, 1e-9))
    return failures

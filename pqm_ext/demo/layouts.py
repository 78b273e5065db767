"""Writing synthesised speakers in the real corpora's directory layouts.

LibriSpeech: ``LibriSpeech/<subset>/<reader>/<chapter>/<reader>-<chapter>-<NNNN>.flac``, one
``<reader>-<chapter>.trans.txt`` per chapter (upper-case transcripts) and ``LibriSpeech/SPEAKERS.TXT``;
readers have numeric ids and up to 20 utterances per chapter. Noise is added per utterance.

TED-LIUM 3: ``TEDLIUM_release-3/legacy/<subset>/sph/<talk>.sph`` (16 kHz NIST SPHERE) and
``stm/<talk>.stm``. A talk is its speaker's utterances in order, separated by 0.3-1.0 s pauses, after a
noise-only lead-in marked ``ignore_time_segment_in_scoring`` as in the real stm files; noise is added
over the whole talk. Transcripts are written the TED-LIUM way: lower case with contractions split
(``i 'm``).
"""
from __future__ import annotations

import hashlib
import math
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import soundfile as sf

from pqm_ext.demo.channel import SAMPLE_RATE, finish, sox
from pqm_ext.demo.speakers import SpeakerSpec
from pqm_ext.demo.text import Sentence
from pqm_ext.demo.voices import synthesise

LAYOUTS = ("librispeech", "tedlium3")
SUBSETS = {
    "librispeech": {"target": "train-clean-360", "pool": "train-clean-100", "dev": "dev-clean"},
    "tedlium3": {"target": "train", "pool": "train", "dev": "dev", "eval": "test"},
}
CHAPTER_SIZE = 20
TALK_FIRST = ("Ada", "Bram", "Cleo", "Dara", "Emil", "Fern", "Gus", "Hana", "Ivo", "Jun", "Kira", "Leon", "Mina",
              "Nils", "Opal", "Pia", "Quin", "Rhea", "Sol", "Tess", "Uma", "Vik", "Wren", "Yara", "Zeno")
TALK_LAST = ("Abbott", "Banks", "Carver", "Dunn", "Ellis", "Frost", "Grant", "Hale", "Irwin", "Joyce", "Knox",
             "Lowe", "Marsh", "Noble", "Oakes", "Pike", "Quill", "Reyes", "Stone", "Tate", "Vance", "Webb")


@dataclass
class SpeakerPlan:
    id: str
    spec: SpeakerSpec
    subset: str
    sentences: List[Sentence]
    utt_ids: List[str] = field(default_factory=list)
    chapters: List[str] = field(default_factory=list)  # LibriSpeech: chapter of each utterance


def speaker_ids(layout: str, n: int, rng: random.Random) -> List[str]:
    """``n`` distinct speaker ids in the layout's style (reader numbers, or Name_Year talk ids)."""
    if layout == "librispeech":
        return [str(i) for i in rng.sample(range(100, 9999), n)]
    names = [f + l for f in TALK_FIRST for l in TALK_LAST]
    return [f"{name}_{rng.randint(2006, 2017)}" for name in rng.sample(names, n)]


def assign_utterances(layout: str, plans: Sequence[SpeakerPlan], rng: random.Random) -> None:
    """Fill in utterance ids (and LibriSpeech chapters)."""
    if layout != "librispeech":
        return
    n_chapters = sum(math.ceil(len(p.sentences) / CHAPTER_SIZE) for p in plans)
    chapter_ids = iter(rng.sample(range(1000, 300000), n_chapters))
    for p in plans:
        k = math.ceil(len(p.sentences) / CHAPTER_SIZE)
        sizes = [len(p.sentences) // k + (i < len(p.sentences) % k) for i in range(k)]
        for size in sizes:
            chapter = str(next(chapter_ids))
            for j in range(size):
                p.chapters.append(chapter)
                p.utt_ids.append(f"{p.id}-{chapter}-{j:04d}")


def noise_rng(seed: int, key: str) -> np.random.Generator:
    """A generator fixed by the corpus seed and an utterance or talk id."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def render(spec: SpeakerSpec, sentence: Sentence, scratch: Path) -> np.ndarray:
    """TTS + the voice and room effects of the channel (no noise or line yet): float32 at 16 kHz."""
    tts = scratch / "tts.wav"
    synthesise(spec.voice, sentence.spoken, tts)
    return sox(tts, scratch / "voice.wav", spec.channel.voice_effects())


def write_librispeech_speaker(plan: SpeakerPlan, root: Path, seed: int) -> float:
    """Write one reader's flac files and trans.txt files; returns seconds of audio."""
    seconds = 0.0
    by_chapter: Dict[str, List[str]] = {}
    with tempfile.TemporaryDirectory(prefix="pqm-tts-") as scratch:
        for utt, chapter, sentence in zip(plan.utt_ids, plan.chapters, plan.sentences):
            out_dir = root / "LibriSpeech" / plan.subset / plan.id / chapter
            out_dir.mkdir(parents=True, exist_ok=True)
            audio = finish(render(plan.spec, sentence, Path(scratch)), plan.spec.channel, noise_rng(seed, utt),
                           Path(scratch))
            sf.write(str(out_dir / f"{utt}.flac"), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            seconds += len(audio) / SAMPLE_RATE
            by_chapter.setdefault(chapter, []).append(f"{utt} {sentence.transcript}\n")
    for chapter, lines in by_chapter.items():
        trans = root / "LibriSpeech" / plan.subset / plan.id / chapter / f"{plan.id}-{chapter}.trans.txt"
        trans.write_text("".join(lines), encoding="utf-8")
    return seconds


def write_speakers_txt(plans: Sequence[SpeakerPlan], seconds: Dict[str, float], root: Path, seed: int) -> None:
    lines = [f"; Demo corpus in the LibriSpeech layout, synthesised offline by pqm_ext.demo (seed {seed}).\n",
             "; NAME is the TTS voice and the speaker's channel.\n",
             ";ID  |SEX| SUBSET           |MINUTES| NAME\n"]
    for p in sorted(plans, key=lambda p: int(p.id)):
        lines.append(f"{p.id:<5}| {p.spec.voice.gender.upper()} | {p.subset:<16} | {seconds[p.id] / 60:5.2f} | "
                     f"{p.spec.describe()}\n")
    (root / "LibriSpeech" / "SPEAKERS.TXT").write_text("".join(lines), encoding="utf-8")


def tedlium_words(transcript: str) -> str:
    """A normalised transcript written the TED-LIUM way: lower case, contractions split."""
    return re.sub(r"(\w)'", r"\1 '", transcript.lower())


def write_tedlium_talk(plan: SpeakerPlan, root: Path, seed: int) -> float:
    """Write one talk's sph and stm; returns seconds of audio."""
    rng = random.Random(f"talk-{seed}-{plan.id}")
    pad = 0.1
    pieces: List[np.ndarray] = []
    lead = rng.uniform(1.0, 2.0)
    pieces.append(np.zeros(int(lead * SAMPLE_RATE), dtype=np.float32))
    gender = "male" if plan.spec.voice.gender == "m" else "female"
    stm = [f"{plan.id} 1 {plan.id} 0.00 {math.floor((lead - pad) * 100) / 100:.2f} <o,f0,unknown> "
           f"ignore_time_segment_in_scoring\n"]
    pos = len(pieces[0])
    with tempfile.TemporaryDirectory(prefix="pqm-tts-") as scratch:
        for sentence in plan.sentences:
            gap = np.zeros(int(rng.uniform(0.3, 1.0) * SAMPLE_RATE), dtype=np.float32)
            pieces.append(gap)
            pos += len(gap)
            audio = render(plan.spec, sentence, Path(scratch))
            start = math.floor((pos / SAMPLE_RATE - pad) * 100) / 100
            end = math.ceil(((pos + len(audio)) / SAMPLE_RATE + pad) * 100) / 100
            stm.append(f"{plan.id} 1 {plan.id} {start:.2f} {end:.2f} <o,f0,{gender}> "
                       f"{tedlium_words(sentence.transcript)}\n")
            pieces.append(audio)
            pos += len(audio)
        pieces.append(np.zeros(int(0.5 * SAMPLE_RATE), dtype=np.float32))
        talk = finish(np.concatenate(pieces), plan.spec.channel, noise_rng(seed, plan.id), Path(scratch))
    base = root / "TEDLIUM_release-3" / "legacy" / plan.subset
    (base / "sph").mkdir(parents=True, exist_ok=True)
    (base / "stm").mkdir(parents=True, exist_ok=True)
    sf.write(str(base / "sph" / f"{plan.id}.sph"), talk, SAMPLE_RATE, format="NIST", subtype="PCM_16")
    (base / "stm" / f"{plan.id}.stm").write_text("".join(stm), encoding="utf-8")
    return len(talk) / SAMPLE_RATE

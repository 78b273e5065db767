"""Synthesise a miniature LibriSpeech or TED-LIUM 3 corpus offline, deterministically for a seed.

Text: every sentence of a target, dev or eval speaker is used once in the whole corpus, so whatever
adaptation/test split data prep makes, test sentences never occur in pretraining or adaptation text;
pretraining-pool speakers read the remaining sentences (several pool speakers may share one).

Output in ``out``: the corpus tree (pqm_ext.demo.layouts), ``speakers.yaml`` (voice, channel, subset,
utterances and seconds per speaker) and ``.synth_done.yaml`` (the options and the synthesis time),
written last: a complete ``out`` for the same options is skipped. Everything is built in a temporary
directory inside ``out`` and moved into place at the end.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import yaml
from tqdm import tqdm

from pqm_ext.demo.layouts import (LAYOUTS, SUBSETS, SpeakerPlan, assign_utterances, speaker_ids,
                                  write_librispeech_speaker, write_speakers_txt, write_tedlium_talk)
from pqm_ext.demo.speakers import make_roster
from pqm_ext.demo.text import FORTUNES_ALL, load_sentences
from pqm_ext.demo.voices import check_engines

MARKER = ".synth_done.yaml"
# Bumped whenever a change to voices, channels, text selection or layouts changes the files for a seed.
DEMO_VERSION = 1
TREE = {"librispeech": "LibriSpeech", "tedlium3": "TEDLIUM_release-3"}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo corpus. The defaults give 30 speakers and 1396 utterances (1.5 h of speech; the
    TED-LIUM layout adds 2 legacy test talks: 32 talks, 1412 segments, 1.8 h), synthesised in about 100 s with
    nj=2 on 2 cores."""

    layout: str = "librispeech"
    seed: int = 0
    num_target_speakers: int = 12
    num_pool_speakers: int = 16
    adapt_per_speaker: int = 20
    test_per_speaker: int = 15
    pool_per_speaker: int = 60
    dev_speakers: int = 2
    dev_per_speaker: int = 8
    text_files: Tuple[str, ...] = field(default=FORTUNES_ALL)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        sizes = {k: v for k, v in asdict(self).items() if isinstance(v, int) and k != "seed"}
        bad = [k for k, v in sizes.items() if v < 1]
        if bad:
            raise ValueError(f"sizes must be positive: {', '.join(bad)}")

    def counts(self) -> Dict[str, int]:
        counts = {"target": self.num_target_speakers, "pool": self.num_pool_speakers, "dev": self.dev_speakers}
        if self.layout == "tedlium3":
            counts["eval"] = self.dev_speakers  # legacy/test talks, so the layout is complete
        return counts

    def utterances(self, role: str) -> int:
        return {"target": self.adapt_per_speaker + self.test_per_speaker, "pool": self.pool_per_speaker,
                "dev": self.dev_per_speaker, "eval": self.dev_per_speaker}[role]

    def record(self) -> Dict:
        d = asdict(self)
        d["text_files"] = list(self.text_files)
        d["version"] = DEMO_VERSION
        return d


def plan_corpus(config: DemoConfig) -> List[SpeakerPlan]:
    """Speakers, their ids, subsets and sentences: everything but the audio."""
    sentences = load_sentences(config.text_files, config.seed)
    roster = make_roster(config.counts(), config.seed)
    rng = random.Random(f"ids-{config.seed}")
    ids = speaker_ids(config.layout, len(roster), rng)
    held_out = sum(config.utterances(s.role) for s in roster if s.role != "pool")
    pool_need = config.pool_per_speaker if config.num_pool_speakers else 0
    if held_out + pool_need > len(sentences):
        raise ValueError(f"the text sources have {len(sentences)} usable sentences; this corpus needs {held_out} "
                         f"held-out ones plus {pool_need} for the pretraining pool: reduce the sizes or add "
                         f"--text_files")
    unique, rest = iter(sentences[:held_out]), sentences[held_out:]
    plans, offset = [], 0
    for spk_id, spec in zip(ids, roster):
        n = config.utterances(spec.role)
        if spec.role == "pool":  # rotate through the remaining sentences, distinct within a speaker
            chosen = [rest[(offset + j) % len(rest)] for j in range(n)]
            offset += n
        else:
            chosen = [next(unique) for _ in range(n)]
        plans.append(SpeakerPlan(spk_id, spec, SUBSETS[config.layout][spec.role], chosen))
    assign_utterances(config.layout, plans, rng)
    return plans


def _write_speaker(job: Tuple[str, SpeakerPlan, str, int]) -> Tuple[str, float, int]:
    layout, plan, root, seed = job
    writer = write_librispeech_speaker if layout == "librispeech" else write_tedlium_talk
    return plan.id, writer(plan, Path(root), seed), len(plan.sentences)


def _speakers_yaml(config: DemoConfig, plans: List[SpeakerPlan], seconds: Dict[str, float]) -> Dict:
    return {
        "layout": config.layout,
        "seed": config.seed,
        "sizes": {k: v for k, v in config.record().items() if k not in ("layout", "seed", "version")},
        "data_prep_options": {"num_target_speakers": config.num_target_speakers,
                              "max_adapt": config.adapt_per_speaker, "num_test": config.test_per_speaker},
        "target_speakers": sorted(p.id for p in plans if p.spec.role == "target"),
        "speakers": [{
            "id": p.id, "role": p.spec.role, "subset": p.subset, "gender": p.spec.voice.gender,
            "description": p.spec.describe(), "voice": p.spec.voice.as_dict(),
            "channel": p.spec.channel.as_dict(), "utterances": len(p.sentences),
            "seconds": round(seconds[p.id], 2),
        } for p in plans],
    }


def is_complete(out: Path, config: DemoConfig) -> bool:
    """True when ``out`` holds a finished corpus for ``config``; an unfinished or other one raises."""
    marker = out / MARKER
    if not marker.is_file():
        return False
    with open(marker, encoding="utf-8") as f:
        done = yaml.safe_load(f) or {}
    if done.get("config") == config.record():
        return True
    raise FileExistsError(f"{out}: holds a demo corpus made with other options or by another version of the "
                          f"synthesiser ({marker}); remove it or choose another --out (pqm.sh/run.sh: --demo_dir)")


def synth_demo_corpus(config: DemoConfig, out: Path, nj: int = 1) -> Path:
    """Write the demo corpus for ``config`` into ``out`` (skipped when complete); returns ``out``."""
    out = Path(out)
    if is_complete(out, config):
        logging.info("%s: demo corpus complete, skipping", out)
        return out
    check_engines()
    start = time.time()
    plans = plan_corpus(config)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".synth.tmp-", dir=out))
    try:
        jobs = sorted(((config.layout, p, str(stage), config.seed) for p in plans),
                      key=lambda j: -len(j[1].sentences))
        seconds: Dict[str, float] = {}
        total = sum(len(p.sentences) for p in plans)
        pool = multiprocessing.Pool(nj) if nj > 1 else None
        try:
            results = pool.imap_unordered(_write_speaker, jobs) if pool else map(_write_speaker, jobs)
            with tqdm(total=total, desc=f"synthesise {config.layout}", unit="utt") as bar:
                for spk, secs, n in results:
                    seconds[spk] = secs
                    bar.update(n)
        finally:
            if pool:
                pool.terminate()
                pool.join()
        if config.layout == "librispeech":
            write_speakers_txt(plans, seconds, stage, config.seed)
        with open(stage / "speakers.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(_speakers_yaml(config, plans, seconds), f, sort_keys=False)
        for name in (TREE[config.layout], "speakers.yaml"):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    elapsed = time.time() - start
    hours = sum(seconds.values()) / 3600
    with open(out / MARKER, "w", encoding="utf-8") as f:
        yaml.safe_dump({"config": config.record(), "nj": nj, "synthesis_seconds": round(elapsed, 1),
                        "utterances": total, "speakers": len(plans), "audio_hours": round(hours, 3)},
                       f, sort_keys=False)
    logging.info("%s: %d speakers, %d utterances, %.2f h of audio in %.1f s (nj=%d)", out, len(plans), total,
                 hours, elapsed, nj)
    return out

"""The demo corpus's speakers: a TTS voice plus a fixed channel each, drawn deterministically from a seed.

Roles: ``target`` speakers (the SA set) are made hard on purpose, because clean TTS voices show almost
no NF4 loss (shared/notes/anchors.md). Two kinds of hard, calibrated with Whisper tiny.en (fp32,
greedy, 6 sentences per voice):

* the natural voices (flite, festival; clean WER 0.00-0.16) each get one of the hard channel recipes
  below (telephone band, hall reverb, street noise, pitch and tempo shifts, overdriven radio, ...) with
  jittered parameters: WER 0.1-0.7;
* espeak-ng accents (clean WER 0.36-0.81 at the default 175 words/min) speak at 140-175 words/min with
  only a light channel: WER 0.2-0.4.

The 12 default targets (seed 0) averaged WER 0.38, so NF4 losses and adaptation gains have room to show.

``pool`` (LoRA pretraining), ``dev`` and ``eval`` speakers get mild channels (small pitch/tempo
changes, light reverb, quiet noise). Voices are spread over the engines and reused (least-used first)
only when an engine runs out, so every speaker differs from every other one in voice or channel.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from pqm_ext.demo.channel import Channel
from pqm_ext.demo.voices import Voice, catalogue

ROLES = ("target", "pool", "dev", "eval")


def _u(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi), 2)


def _i(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(lo, hi)


# Hard channels for target speakers: name -> parameters drawn from rng.
TARGET_RECIPES: Dict[str, Callable[[random.Random], Dict]] = {
    "telephone": lambda r: dict(band=(_i(r, 250, 350), _i(r, 3200, 3500)), noise="pink", snr_db=_u(r, 12, 18)),
    "hall": lambda r: dict(reverb=_i(r, 70, 90), room_scale=100, noise="white", snr_db=_u(r, 18, 25)),
    "street": lambda r: dict(band=(0, _i(r, 3500, 5000)), noise="brown", snr_db=_u(r, 5, 10)),
    "high-fast": lambda r: dict(pitch_cents=_i(r, 300, 450), tempo=_u(r, 1.1, 1.25), noise="white",
                                snr_db=_u(r, 15, 22)),
    "deep-slow": lambda r: dict(pitch_cents=-_i(r, 300, 450), tempo=_u(r, 0.85, 0.92), reverb=_i(r, 30, 50)),
    "radio": lambda r: dict(band=(_i(r, 300, 500), _i(r, 2800, 3400)), overdrive=_i(r, 5, 10), noise="hum",
                            snr_db=_u(r, 12, 18)),
    "cafe": lambda r: dict(noise="pink", snr_db=_u(r, 8, 12), reverb=_i(r, 30, 45)),
    "muffled": lambda r: dict(band=(0, _i(r, 1500, 2200)), noise="brown", snr_db=_u(r, 12, 18)),
    "far-field": lambda r: dict(reverb=_i(r, 80, 100), room_scale=_i(r, 80, 100), noise="pink",
                                snr_db=_u(r, 10, 15)),
    "mains-hum": lambda r: dict(noise="hum", snr_db=_u(r, 5, 10), pitch_cents=_i(r, 200, 300)),
    "tinny": lambda r: dict(band=(_i(r, 800, 1200), 0), noise="white", snr_db=_u(r, 10, 15)),
    "fast-echo": lambda r: dict(tempo=_u(r, 1.2, 1.35), reverb=_i(r, 50, 70)),
}


def mild_channel(rng: random.Random) -> Channel:
    """A near-clean channel for pretraining / dev speakers."""
    params = dict(pitch_cents=_i(rng, -150, 150), tempo=_u(rng, 0.93, 1.07))
    if rng.random() < 0.5:
        params["reverb"] = _i(rng, 10, 30)
    if rng.random() < 0.5:
        params.update(noise=rng.choice(("white", "pink")), snr_db=_u(rng, 25, 40))
    return Channel(name="mild", level_db=-_u(rng, 1, 6), **params)


def hard_channel(recipe: str, rng: random.Random) -> Channel:
    return Channel(name=recipe, level_db=-_u(rng, 1, 6), **TARGET_RECIPES[recipe](rng))


def accent_channel(rng: random.Random) -> Channel:
    """A light channel for espeak-ng targets, whose accent and formant synthesis are hard enough."""
    params = dict(pitch_cents=_i(rng, -200, 200))
    if rng.random() < 0.5:
        params["reverb"] = _i(rng, 15, 35)
    else:
        params.update(noise=rng.choice(("white", "pink", "brown")), snr_db=_u(rng, 20, 30))
    return Channel(name="accent", level_db=-_u(rng, 1, 6), **params)


# Engine order per role: every natural voice is a target first; the pool mixes engines.
ENGINE_CYCLE = {
    "target": ("flite", "espeak-ng", "festival", "flite", "flite", "espeak-ng", "festival", "flite", "espeak-ng",
               "flite", "festival", "espeak-ng"),
    "pool": ("flite", "espeak-ng", "festival", "espeak-ng", "flite", "espeak-ng", "flite", "espeak-ng"),
    "dev": ("flite", "espeak-ng", "festival"),
    "eval": ("espeak-ng", "flite", "festival"),
}


@dataclass(frozen=True)
class SpeakerSpec:
    role: str
    voice: Voice
    channel: Channel

    def describe(self) -> str:
        return f"{self.voice.describe()}; {self.channel.describe()}"


def make_roster(counts: Dict[str, int], seed: int) -> List[SpeakerSpec]:
    """Speakers for ``counts`` (role -> number), in role order then draw order; same seed, same roster."""
    rng = random.Random(f"roster-{seed}")
    voices = catalogue()
    for engine_voices in voices.values():
        rng.shuffle(engine_voices)
    used: Dict[Tuple[str, str, str], int] = {}
    recipes = list(TARGET_RECIPES)
    rng.shuffle(recipes)
    roster: List[SpeakerSpec] = []
    n_hard = 0
    for role in ROLES:
        cycle: Sequence[str] = ENGINE_CYCLE[role]
        for i in range(counts.get(role, 0)):
            engine = cycle[i % len(cycle)]
            # Least-used voice of the engine, ties broken by the shuffled order.
            base = min(voices[engine], key=lambda v: used.get((v.engine, v.name, v.variant), 0))
            used[(base.engine, base.name, base.variant)] = used.get((base.engine, base.name, base.variant), 0) + 1
            if engine == "espeak-ng":
                base = Voice(base.engine, base.name, base.gender, base.variant, speed=_i(rng, 140, 175),
                             pitch=_i(rng, 25, 75))
            if role != "target":
                channel = mild_channel(rng)
            elif engine == "espeak-ng":
                channel = accent_channel(rng)
            else:
                channel = hard_channel(recipes[n_hard % len(recipes)], rng)
                n_hard += 1
            roster.append(SpeakerSpec(role, base, channel))
    return roster

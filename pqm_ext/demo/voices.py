"""Offline TTS voices from Debian (flite, festival, espeak-ng) that give the demo corpus its speakers.

flite and festival give fairly natural voices; espeak-ng gives many accents (Scottish, Lancastrian,
West Midlands, Caribbean, New York, RP) and voice variants, which make speakers that an ASR model
finds hard. All engines are deterministic: the same text gives the same samples.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

ENGINES = {"flite": "flite", "festival": "text2wave", "espeak-ng": "espeak-ng"}

# (name, gender); flite "kal" is an 8 kHz voice.
FLITE_VOICES: Tuple[Tuple[str, str], ...] = (("awb", "m"), ("rms", "m"), ("slt", "f"), ("kal16", "m"), ("kal", "m"))
FESTIVAL_VOICES: Tuple[Tuple[str, str], ...] = (("cmu_us_slt_arctic_hts", "f"), ("kal_diphone", "m"),
                                                ("ked_diphone", "m"))
ESPEAK_ACCENTS: Tuple[str, ...] = ("en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
                                   "en-gb-x-rp", "en-us", "en-gb")
ESPEAK_VARIANTS: Tuple[Tuple[str, str], ...] = (("m3", "m"), ("f3", "f"), ("m1", "m"), ("f2", "f"), ("m5", "m"),
                                                ("f4", "f"), ("m2", "m"), ("f1", "f"), ("m6", "m"), ("f5", "f"),
                                                ("m4", "m"), ("klatt", "m"), ("m7", "m"), ("klatt3", "m"))


@dataclass(frozen=True)
class Voice:
    engine: str        # flite | festival | espeak-ng
    name: str          # the engine's voice name
    gender: str        # m | f (nominal; pitch shifts may move it)
    variant: str = ""  # espeak-ng voice variant (e.g. m3, f2)
    speed: int = 0     # espeak-ng words per minute (0: the voice's default)
    pitch: int = -1    # espeak-ng base pitch 0-99 (-1: the voice's default)

    def describe(self) -> str:
        return f"{self.engine} {self.name}" + (f"+{self.variant}" if self.variant else "")

    def as_dict(self) -> Dict:
        return asdict(self)


def check_engines() -> None:
    """Fail early, with the fix, when a TTS program is missing."""
    missing = [exe for exe in ENGINES.values() if shutil.which(exe) is None] + \
              [exe for exe in ("sox",) if shutil.which(exe) is None]
    if missing:
        raise RuntimeError(f"missing programs: {', '.join(missing)} (run tools/install.sh to install "
                           f"sox, flite, festival and espeak-ng)")


def catalogue() -> Dict[str, List[Voice]]:
    """All base voices by engine (espeak-ng: accent x variant pairs, accents varying fastest)."""
    espeak = [Voice("espeak-ng", accent, gender, variant)
              for variant, gender in ESPEAK_VARIANTS for accent in ESPEAK_ACCENTS]
    return {
        "flite": [Voice("flite", name, gender) for name, gender in FLITE_VOICES],
        "festival": [Voice("festival", name, gender) for name, gender in FESTIVAL_VOICES],
        "espeak-ng": espeak,
    }


def synthesise(voice: Voice, text: str, wav_path: Path) -> None:
    """Speak ``text`` with ``voice`` into ``wav_path`` (the engine's own sample rate)."""
    txt = wav_path.with_suffix(".txt")
    txt.write_text(text + "\n", encoding="utf-8")
    if voice.engine == "flite":
        cmd = ["flite", "-voice", voice.name, "-f", str(txt), "-o", str(wav_path)]
    elif voice.engine == "festival":
        cmd = ["text2wave", "-eval", f"(voice_{voice.name})", str(txt), "-o", str(wav_path)]
    elif voice.engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", voice.name + (f"+{voice.variant}" if voice.variant else ""), "-f", str(txt),
               "-w", str(wav_path)]
        if voice.speed:
            cmd += ["-s", str(voice.speed)]
        if voice.pitch >= 0:
            cmd += ["-p", str(voice.pitch)]
    else:
        raise ValueError(f"unknown TTS engine {voice.engine!r}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wav_path.is_file() or wav_path.stat().st_size < 100:
        raise RuntimeError(f"{voice.describe()} failed on {text!r}: {' '.join(cmd)}: {proc.stderr.strip()}")

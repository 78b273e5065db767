"""A speaker's fixed recording channel: voice and room (pitch, tempo, reverb), additive noise at a
given SNR, then the line (band limit, overdrive), so that a telephone band limits the noise too.

sox runs with dither off and writes float samples, and noise comes from numpy with a seed derived from
the utterance (or talk), so rendering is deterministic. Noise is added in numpy so that its level can
be set against the speech power of each signal.
"""
from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
NOISES = ("white", "pink", "brown", "hum")


@dataclass(frozen=True)
class Channel:
    name: str = "clean"                    # the channel recipe it was drawn from
    pitch_cents: int = 0
    tempo: float = 1.0
    reverb: int = 0                        # sox reverberance in %, 0: none
    room_scale: int = 100                  # sox room scale in %
    band: Optional[Tuple[int, int]] = None  # (low Hz, high Hz); low 0: low-pass, high 0: high-pass
    overdrive: int = 0                     # sox overdrive gain in dB, 0: none
    noise: str = ""                        # one of NOISES, "": none
    snr_db: float = 0.0
    level_db: float = -3.0                 # peak level of the output

    def voice_effects(self) -> List[str]:
        """sox effects of the speaker and the room: resampling, pitch, tempo, reverb."""
        fx = ["remix", "-", "rate", "-v", str(SAMPLE_RATE)]
        if self.pitch_cents:
            fx += ["pitch", str(self.pitch_cents)]
        if abs(self.tempo - 1.0) > 1e-6:
            fx += ["tempo", "-s", f"{self.tempo:.3f}"]
        if self.reverb:
            fx += ["reverb", str(self.reverb), "50", str(self.room_scale)]
        return fx

    def line_effects(self) -> List[str]:
        """sox effects of the microphone and line, applied after the noise: band limit, overdrive."""
        fx = []
        if self.band:
            low, high = self.band
            fx += ["sinc", f"{low}-{high}" if low and high else (f"-{high}" if high else str(low))]
        if self.overdrive:
            fx += ["overdrive", str(self.overdrive)]
        return fx

    def describe(self) -> str:
        parts = [self.name]
        if self.pitch_cents:
            parts.append(f"pitch {self.pitch_cents:+d} cents")
        if abs(self.tempo - 1.0) > 1e-6:
            parts.append(f"tempo x{self.tempo:.2f}")
        if self.reverb:
            parts.append(f"reverb {self.reverb}%")
        if self.band:
            parts.append(f"band {self.band[0]}-{self.band[1] or 'inf'} Hz")
        if self.overdrive:
            parts.append(f"overdrive {self.overdrive} dB")
        if self.noise:
            parts.append(f"{self.noise} noise {self.snr_db:.0f} dB SNR")
        return ", ".join(parts)

    def as_dict(self) -> Dict:
        d = asdict(self)
        d["band"] = list(self.band) if self.band else None
        return d


def sox(wav_in: Path, wav_out: Path, effects: List[str]) -> np.ndarray:
    """Run sox (dither off, float output) on ``wav_in``; returns float32 mono samples at 16 kHz."""
    cmd = ["sox", "-D", "-V1", str(wav_in), "-e", "floating-point", "-b", "32", str(wav_out)] + effects
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sox failed: {' '.join(cmd)}: {proc.stderr.strip()}")
    samples, rate = sf.read(str(wav_out), dtype="float32")
    if rate != SAMPLE_RATE or samples.ndim != 1:
        raise RuntimeError(f"sox gave {rate} Hz, shape {samples.shape}: {' '.join(cmd)}")
    return samples


def speech_power(x: np.ndarray, frame: int = 320) -> float:
    """Mean power of the frames within 30 dB of the loudest one (i.e. ignoring pauses)."""
    n = len(x) // frame
    if n == 0:
        return float(np.mean(x.astype(np.float64) ** 2)) + 1e-12
    p = np.mean(x[:n * frame].astype(np.float64).reshape(n, frame) ** 2, axis=1)
    return float(np.mean(p[p >= p.max() * 1e-3])) + 1e-12


def make_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise of ``kind``."""
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        f0 = 50.0 if rng.random() < 0.5 else 60.0
        x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 8))
        x = x + 0.1 * rng.standard_normal(n)
    else:
        x = rng.standard_normal(n)
        if kind in ("pink", "brown"):
            spectrum = np.fft.rfft(x)
            f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
            spectrum /= f ** (0.5 if kind == "pink" else 1.0)
            x = np.fft.irfft(spectrum, n)
        elif kind != "white":
            raise ValueError(f"unknown noise {kind!r}; choose from {NOISES}")
    return x / np.sqrt(np.mean(x ** 2) + 1e-20)


def finish(x: np.ndarray, channel: Channel, rng: np.random.Generator, scratch: Path) -> np.ndarray:
    """Add the channel's noise, apply its line effects and scale to its peak level (float32 out)."""
    x = x.astype(np.float64)
    if channel.noise:
        scale = np.sqrt(speech_power(x) / 10 ** (channel.snr_db / 10))
        x = x + scale * make_noise(channel.noise, len(x), rng)
    x = x / (np.max(np.abs(x)) + 1e-12) * 0.5  # headroom for the line effects
    line = channel.line_effects()
    if line:
        sf.write(str(scratch / "line_in.wav"), x.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
        x = sox(scratch / "line_in.wav", scratch / "line_out.wav", line).astype(np.float64)
    peak = np.max(np.abs(x)) + 1e-12
    return (x * (10 ** (channel.level_db / 20) / peak)).astype(np.float32)

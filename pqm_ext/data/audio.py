"""Reading corpus audio (flac, wav, NIST sph) with errors that name the file.

libsndfile reads flac, wav and uncompressed sph. Shorten-compressed sph (some LDC releases) is decoded
with ``sph2pipe`` when it is on PATH, as Kaldi's recipes do.
"""
from __future__ import annotations

import io
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import soundfile as sf

from pqm_ext.utils.errors import InputError

PathLike = Union[str, Path]


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    num_frames: int
    channels: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.sample_rate


def _sph2pipe(path: Path) -> Optional[bytes]:
    exe = shutil.which("sph2pipe")
    if exe is None or path.suffix.lower() != ".sph":
        return None
    proc = subprocess.run([exe, "-f", "wav", str(path)], capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def audio_info(path: PathLike) -> AudioInfo:
    """Header information; raises InputError if the file is missing or not audio."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "audio file does not exist")
    try:
        info = sf.info(str(path))
        return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels))
    except (sf.LibsndfileError, RuntimeError) as e:
        data = _sph2pipe(path)
        if data is None:
            raise InputError(path, f"cannot read audio header: {e}") from None
        info = sf.info(io.BytesIO(data))
        return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels))


def read_audio(path: PathLike, dtype: str = "float32") -> Tuple[np.ndarray, int]:
    """Decode a whole file to ``(samples, sample_rate)``, mono (channels averaged)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "audio file does not exist")
    try:
        samples, rate = sf.read(str(path), dtype=dtype, always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        data = _sph2pipe(path)
        if data is None:
            raise InputError(path, f"cannot decode audio: {e}") from None
        samples, rate = sf.read(io.BytesIO(data), dtype=dtype, always_2d=True)
    if samples.shape[0] == 0:
        raise InputError(path, "audio file has no samples")
    if samples.shape[1] > 1:
        samples = samples.astype(np.float64).mean(axis=1)
        samples = samples.astype(dtype) if dtype.startswith("float") else np.round(samples).astype(dtype)
    else:
        samples = samples[:, 0]
    return samples, int(rate)


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling (float in, float out); identity when the rates match."""
    if rate_in == rate_out:
        return samples
    from scipy.signal import resample_poly

    g = math.gcd(rate_in, rate_out)
    return resample_poly(samples.astype(np.float64), rate_out // g, rate_in // g).astype(np.float32)


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16, clipping."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)

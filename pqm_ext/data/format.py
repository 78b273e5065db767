"""Stage 2: turn a prepared data dir into one ESPnet reads directly (wav.scp of type ``sound``).

Every utterance becomes a 16 kHz mono 16-bit file ``DST/data/<utt>.wav`` (or ``.flac`` with
``audio_format="flac"``, ESPnet's default: lossless, typically about half the disk of WAV, which is
~51 GB for the TED-LIUM 3 pool, for some CPU when reading): cut out of its recording
when the source has ``segments`` (TED-LIUM), resampled when the source rate differs, channels
averaged. DST gets wav.scp (absolute paths), text, utt2spk, spk2utt, utt2num_samples (and spk2gender
when the source has it). DST is built in a temporary directory, validated and renamed, and records its
source in ``.format_data_dir.yaml``: a complete DST for the same source is skipped, one made from an
older source is rebuilt, and a DST that this step did not write is never touched.

A training set can be limited to a duration range (ESPnet's ``--min_wav_duration``/``--max_wav_duration``,
asr.sh's "remove short/long data"): Whisper's encoder sees only the first 30 s of an utterance while its
target keeps every word, and a Conformer batch is sized by its longest utterance. Test sets keep everything.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import soundfile as sf
import yaml
from tqdm import tqdm

from pqm_ext.data.audio import audio_info, read_audio, resample, to_int16
from pqm_ext.data.kaldi_dir import DataDir, read_data_dir, validate_data_dir
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import atomic_dir

MARKER = ".format_data_dir.yaml"
SOURCE_FILES = ("wav.scp", "segments", "text", "utt2spk", "spk2gender")

AUDIO_FORMATS = {"wav": "WAV", "flac": "FLAC"}  # file extension -> libsndfile format

# (recording path, [(utt, start s or None, end s or None)], output dir, sample rate, file extension)
Job = Tuple[str, List[Tuple[str, Optional[float], Optional[float]]], str, int, str]


def source_digest(src: Path) -> str:
    """Hash of the source files, and of the size and mtime of every audio file, that determine DST."""
    h = hashlib.sha1()
    for name in SOURCE_FILES:
        if (src / name).is_file():
            h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    if (src / "wav.scp").is_file():
        for line in (src / "wav.scp").read_text(encoding="utf-8").splitlines():
            path = line.split(maxsplit=1)[-1]
            st = os.stat(path) if os.path.exists(path) else None
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode() if st else f"{path}:missing\n".encode())
    return h.hexdigest()


def _format_recording(job: Job) -> Union[List[Tuple[str, int]], Tuple[str, str]]:
    """Write one recording's utterances; returns [(utt, samples)] or ("error", message)."""
    path, items, out_dir, rate, ext = job
    try:
        if audio_info(path).sample_rate == rate:
            samples, _ = read_audio(path, dtype="int16")
        else:
            samples, src_rate = read_audio(path, dtype="float32")
            samples = to_int16(resample(samples, src_rate, rate))
    except InputError as e:
        return "error", str(e)
    done = []
    for utt, start, end in items:
        a = 0 if start is None else int(round(start * rate))
        b = len(samples) if end is None else min(int(round(end * rate)), len(samples))
        if b <= a:
            return "error", f"{path}: segment '{utt}' ({start}-{end} s) lies outside the recording " \
                            f"({len(samples) / rate:.2f} s)"
        sf.write(str(Path(out_dir) / f"{utt}.{ext}"), samples[a:b], rate, subtype="PCM_16", format=AUDIO_FORMATS[ext])
        done.append((utt, b - a))
    return done


def _jobs(data: DataDir, out_dir: Path, rate: int, ext: str) -> List[Job]:
    if data.segments is None:
        return [(data.wav_scp[u], [(u, None, None)], str(out_dir), rate, ext) for u in data.utts]
    by_rec: Dict[str, List[Tuple[str, Optional[float], Optional[float]]]] = {}
    for utt in data.utts:
        seg = data.segments[utt]
        by_rec.setdefault(seg.recording, []).append((utt, seg.start, seg.end))
    return [(data.wav_scp[r], items, str(out_dir), rate, ext) for r, items in sorted(by_rec.items())]


def is_formatted(src: Path, dst: Path, audio_format: str = "wav",
                 durations: Optional[Tuple[float, float]] = None, sample_rate: int = 16000,
                 digest: Optional[str] = None) -> bool:
    """True when ``dst`` is complete and was formatted from the current ``src`` into ``audio_format`` at
    ``sample_rate`` (limited to the same ``durations``). ``digest``: ``source_digest(src)``, if known."""
    record = read_marker(dst)
    return (record is not None and record.get("source") == str(src.absolute())
            and record.get("digest") == (digest or source_digest(src))
            and record.get("audio_format", "wav") == audio_format
            and record.get("sample_rate") == sample_rate
            and record.get("durations") == (None if durations is None else list(durations)))


def read_marker(dst: Path) -> Optional[Dict]:
    """What DST was made from (None when there is no DST); a DST this step did not write is an error."""
    if not dst.exists():
        return None
    if not (dst / MARKER).is_file():
        raise InputError(dst, "exists but was not written by format_data_dir: remove it or choose another DST")
    with open(dst / MARKER, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def write_marker(dst: Path, src: Path, digest: str, sample_rate: int, utterances: int, audio_format: str,
                 durations: Optional[Tuple[float, float]]) -> None:
    record = {"source": str(src.absolute()), "digest": digest, "sample_rate": sample_rate,
              "utterances": utterances}
    # recorded only when not the default: older dump dirs stay current
    if audio_format != "wav":
        record["audio_format"] = audio_format
    if durations is not None:
        record["durations"] = list(durations)
    with open(dst / MARKER, "w", encoding="utf-8") as f:
        yaml.safe_dump(record, f, sort_keys=False)


def within(utt2num_samples: Dict[str, int], sample_rate: int, durations: Tuple[float, float]) -> List[str]:
    """The utterances lasting ``min <= seconds <= max`` (asr.sh keeps ``min < s < max``); logs what is left out."""
    low, high = durations
    keep = [u for u, n in utt2num_samples.items() if low <= n / sample_rate <= high]
    short = sum(1 for u, n in utt2num_samples.items() if n / sample_rate < low)
    long_ = len(utt2num_samples) - len(keep) - short
    if short or long_:
        lost = sum(n for u, n in utt2num_samples.items() if not low <= n / sample_rate <= high) / sample_rate
        logging.warning("left out %d utterance(s) shorter than %g s and %d longer than %g s (%.1f s of audio)",
                        short, low, long_, high, lost)
    return keep


def format_data_dir(src: Union[str, Path], dst: Union[str, Path], nj: int = 1, sample_rate: int = 16000,
                    check_audio: str = "header", audio_format: str = "wav",
                    durations: Optional[Tuple[float, float]] = None) -> Path:
    """Write DST as described in the module docstring; returns DST. ``durations``: (min, max) seconds of the
    utterances kept (None: all)."""
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {', '.join(AUDIO_FORMATS)}, not {audio_format!r}")
    if durations is not None and not 0 <= durations[0] < durations[1]:
        raise ValueError(f"durations must be (min, max) seconds with 0 <= min < max, not {durations}")
    src, dst = Path(src), Path(dst)
    digest = source_digest(src)  # stats every source audio file: once
    if is_formatted(src, dst, audio_format, durations, sample_rate, digest):
        logging.info("%s is complete: skipping", dst)
        return dst
    if narrow(src, dst, audio_format, durations, sample_rate, digest):
        return dst
    data = validate_data_dir(src, check_audio=check_audio, sample_rate=sample_rate, allow_resample=True)
    final = dst.absolute()
    with atomic_dir(dst, overwrite=True) as tmp:
        wav_dir = tmp / "data"
        wav_dir.mkdir()
        jobs = _jobs(data, wav_dir, sample_rate, audio_format)
        utt2num_samples: Dict[str, int] = {}
        pool = multiprocessing.Pool(nj) if nj > 1 else None
        try:
            results = pool.imap_unordered(_format_recording, jobs) if pool else map(_format_recording, jobs)
            with tqdm(total=len(data.utt2spk), desc=f"format {dst.name}", unit="utt") as bar:
                for result in results:
                    if isinstance(result, tuple):
                        raise InputError(src / "wav.scp", result[1])
                    utt2num_samples.update(result)
                    bar.update(len(result))
        finally:
            if pool:
                pool.terminate()
                pool.join()
        out = DataDir(
            wav_scp={u: str(final / "data" / f"{u}.{audio_format}") for u in data.utts},
            text=data.text, utt2spk=data.utt2spk, utt2num_samples=utt2num_samples, spk2gender=data.spk2gender,
        )
        if durations is not None:
            keep = within(utt2num_samples, sample_rate, durations)
            if not keep:
                raise InputError(src / "wav.scp", f"no utterance lasts {durations[0]:g} to {durations[1]:g} s")
            for utt in set(out.utts) - set(keep):
                (wav_dir / f"{utt}.{audio_format}").unlink()
            out = out.subset(keep)
            utt2num_samples = out.utt2num_samples
        out.write(tmp)
        validate_data_dir(tmp, check_audio="header", sample_rate=sample_rate,
                          remap=(str(final), str(tmp.absolute())))
        write_marker(tmp, src, digest, sample_rate, len(out.utt2spk), audio_format, durations)
    total = sum(utt2num_samples.values()) / sample_rate / 3600
    logging.info("%s: %d utterances, %.2f h of audio", dst, len(utt2num_samples), total)
    return dst


def narrow(src: Path, dst: Path, audio_format: str, durations: Optional[Tuple[float, float]],
           sample_rate: int, digest: str) -> bool:
    """Limit a complete DST made from the same source to a narrower duration range without reading any audio
    (the TED-LIUM 3 pool is ~51 GB): a new DST of hard links to the kept files. False when DST cannot be
    narrowed (another source or format, or a range that would need utterances DST does not hold)."""
    record = read_marker(dst)
    if durations is None or record is None:
        return False
    old = record.get("durations")
    if old is not None and not old[0] <= durations[0] < durations[1] <= old[1]:
        return False
    if not is_formatted(src, dst, audio_format, None if old is None else tuple(old), sample_rate, digest):
        return False
    data = read_data_dir(dst)
    keep = within(data.utt2num_samples, sample_rate, durations)
    if not keep:
        raise InputError(src / "wav.scp", f"no utterance lasts {durations[0]:g} to {durations[1]:g} s")
    with atomic_dir(dst, overwrite=True) as tmp:
        (tmp / "data").mkdir()
        for utt in keep:
            name = f"{utt}.{audio_format}"
            try:
                os.link(dst / "data" / name, tmp / "data" / name)
            except OSError:  # another file system
                shutil.copyfile(dst / "data" / name, tmp / "data" / name)
        data.subset(keep).write(tmp)
        validate_data_dir(tmp, check_audio="header", sample_rate=sample_rate,
                          remap=(str(dst.absolute()), str(tmp.absolute())))
        write_marker(tmp, src, digest, sample_rate, len(keep), audio_format, durations)
    logging.info("%s: limited to %g-%g s without reading its audio again: %d utterances", dst, *durations, len(keep))
    return True

"""Carry a synthesised corpus to a lent GPU machine as Ogg/Opus, and turn it back into FLAC there.

A lent machine takes at most 64 MiB with each call and has no TTS engines, so the corpus is made here
and shrunk ~12x (406 MB of FLAC to 35 MB): Opus at ~13 kbit/s (libsndfile's compression level 0.98) keeps
speech intelligible to ASR. Every other file (transcripts, SPEAKERS.TXT, speakers.yaml) is copied as it is,
so the unpacked tree has the corpus's own layout and the recipe's data preparation reads it unchanged.
Every system decoded there hears the same Opus-coded audio.

    python docs/gpu/opus_corpus.py pack   SRC_CORPUS  PACKED_DIR
    python docs/gpu/opus_corpus.py unpack PACKED_DIR  CORPUS_DIR
"""
from __future__ import annotations

import argparse
import shutil
from multiprocessing import Pool
from pathlib import Path

import soundfile as sf

LEVEL = 0.98  # libsndfile's Opus compression level: 12.6 kbit/s on the demo's 16 kHz speech (0.97: 14.8)


def pack_one(job):
    src, dst = job
    audio, rate = sf.read(src, dtype="float32")
    sf.write(dst, audio, rate, format="OGG", subtype="OPUS", compression_level=LEVEL)


def unpack_one(job):
    src, dst = job
    audio, rate = sf.read(src, dtype="int16")
    sf.write(dst, audio, rate, format="FLAC", subtype="PCM_16")


def convert(src_root: Path, dst_root: Path, audio_in: str, audio_out: str, fn, nj: int) -> None:
    jobs = []
    for src in sorted(p for p in src_root.rglob("*") if p.is_file()):
        dst = dst_root / src.relative_to(src_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == audio_in:
            jobs.append((str(src), str(dst.with_suffix(audio_out))))
        else:
            shutil.copy2(src, dst)
    with Pool(nj) as pool:
        for _ in pool.imap_unordered(fn, jobs, chunksize=16):
            pass
    print(f"{src_root} -> {dst_root}: {len(jobs)} audio files")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--nj", type=int, default=2)
    a = p.parse_args()
    if a.action == "pack":
        convert(a.src, a.dst, ".flac", ".ogg", pack_one, a.nj)
    else:
        convert(a.src, a.dst, ".ogg", ".flac", unpack_one, a.nj)


if __name__ == "__main__":
    main()

"""Stage-2 formatter: 16 kHz mono 16-bit WAV (or FLAC) per utterance, exact cuts, resampling, skip and atomicity."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from data_fixtures import SPLIT_ARGS, librispeech_tree, run_data_sh, tedlium_tree  # noqa: F401
from pqm_ext.data.format import MARKER, format_data_dir
from pqm_ext.data.kaldi_dir import DataDir, read_data_dir, validate_data_dir
from pqm_ext.utils.errors import InputError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, librispeech_tree, tedlium_tree):
    """{corpus: data dir} prepared by the recipes' data.sh."""
    root = tmp_path_factory.mktemp("prepared")
    out = {}
    for layout, tree in (("librispeech", librispeech_tree), ("tedlium3", tedlium_tree)):
        proc = run_data_sh(layout, root, "--data_dir", layout, *SPLIT_ARGS, corpus=tree)
        assert proc.returncode == 0, proc.stderr
        out[layout] = root / layout
    return out


def check_formatted(src: Path, dst: Path, ext: str = "wav") -> DataDir:
    data = validate_data_dir(dst, check_audio="decode")
    source = read_data_dir(src)
    assert data.text == source.text and data.utt2spk == source.utt2spk and data.segments is None
    assert (dst / "spk2utt").read_text() == (src / "spk2utt").read_text()
    for utt, path in data.wav_scp.items():
        assert path == str(dst.absolute() / "data" / f"{utt}.{ext}")
        info = sf.info(path)
        assert (info.format, info.subtype, info.samplerate, info.channels) == (ext.upper(), "PCM_16", 16000, 1)
        assert info.frames == data.utt2num_samples[utt]
    assert sorted(p.name for p in (dst / "data").iterdir()) == sorted(f"{u}.{ext}" for u in data.utt2spk)
    return data


def test_segments_are_cut_exactly_from_sph(tmp_path, prepared):
    src = prepared["tedlium3"] / "sa_test"
    data = check_formatted(src, format_data_dir(src, tmp_path / "sa_test", nj=2))
    source = read_data_dir(src)
    for utt, seg in source.segments.items():
        talk, _ = sf.read(source.wav_scp[seg.recording], dtype="int16")
        expected = talk[round(seg.start * 16000):round(seg.end * 16000)]
        got, _ = sf.read(data.wav_scp[utt], dtype="int16")
        np.testing.assert_array_equal(got, expected)


def test_flac_utterances_are_copied_exactly_and_rerun_skips(tmp_path, prepared):
    src = prepared["librispeech"] / "pretrain"
    dst = tmp_path / "pretrain"
    cmd = [sys.executable, "-m", "pqm_ext.bin.format_data_dir", str(src), str(dst), "--nj", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = check_formatted(src, dst)
    for utt, flac in read_data_dir(src).wav_scp.items():
        np.testing.assert_array_equal(sf.read(data.wav_scp[utt], dtype="int16")[0], sf.read(flac, dtype="int16")[0])

    stamp = [p.stat().st_mtime_ns for p in sorted(dst.rglob("*"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "complete: skipping" in proc.stderr
    assert [p.stat().st_mtime_ns for p in sorted(dst.rglob("*"))] == stamp


def test_flac_output_holds_the_same_samples_and_a_format_change_rebuilds(tmp_path, prepared):
    src = prepared["tedlium3"] / "sa_test"
    wav = check_formatted(src, format_data_dir(src, tmp_path / "wav"))
    flac = check_formatted(src, format_data_dir(src, tmp_path / "flac", audio_format="flac"), ext="flac")
    assert flac.utt2num_samples == wav.utt2num_samples
    for utt in wav.utt2spk:
        np.testing.assert_array_equal(sf.read(flac.wav_scp[utt], dtype="int16")[0],
                                      sf.read(wav.wav_scp[utt], dtype="int16")[0])
    disk = {name: sum(p.stat().st_size for p in (tmp_path / name / "data").iterdir()) for name in ("wav", "flac")}
    assert disk["flac"] < disk["wav"]
    format_data_dir(src, tmp_path / "wav", audio_format="flac")  # the same source in another format: made again
    check_formatted(src, tmp_path / "wav", ext="flac")


def test_a_duration_range_leaves_out_the_others_and_a_new_range_rebuilds(tmp_path, prepared):
    """asr.sh's "remove short/long data" for a training set: utterances outside [min, max] s leave every file
    of the data dir, their audio too; the range is part of what DST was made from."""
    src = prepared["tedlium3"] / "pretrain"
    everything = check_formatted(src, format_data_dir(src, tmp_path / "all"))
    seconds = {u: n / 16000 for u, n in everything.utt2num_samples.items()}
    low, high = sorted(seconds.values())[1], sorted(seconds.values())[-2]  # drops the shortest and the longest
    cmd = [sys.executable, "-m", "pqm_ext.bin.format_data_dir", str(src), str(tmp_path / "dst"),
           "--min_duration", str(low - 1e-4), "--max_duration", str(high + 1e-4)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "left out 1 utterance(s) shorter than" in proc.stderr and "and 1 longer than" in proc.stderr
    data = validate_data_dir(tmp_path / "dst", check_audio="decode")
    kept = sorted(u for u, s in seconds.items() if low - 1e-4 <= s <= high + 1e-4)
    assert data.utts == kept and len(kept) == len(seconds) - 2
    assert sorted(p.name for p in (tmp_path / "dst/data").iterdir()) == [f"{u}.wav" for u in kept]
    assert {u: everything.text[u] for u in kept} == data.text
    assert sorted(u for line in (tmp_path / "dst/spk2utt").read_text().splitlines() for u in line.split()[1:]) == kept
    # the same range again: skipped; a wider range: made again with everything back
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "complete: skipping" in proc.stderr
    assert check_formatted(src, format_data_dir(src, tmp_path / "dst", durations=(0, 1000))).utts == everything.utts
    # a narrower range than the DST holds (an unlimited DST of an older version too) reads no audio again:
    # the same data dir as formatting from scratch, its kept files the very same files
    inode = {u: os.stat(p).st_ino for u, p in everything.wav_scp.items()}
    proc = subprocess.run(cmd[:4] + [str(tmp_path / "all")] + cmd[5:], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "without reading its audio again: %d utterances" % len(kept) in proc.stderr
    narrowed = validate_data_dir(tmp_path / "all", check_audio="decode")
    assert {u: os.stat(p).st_ino for u, p in narrowed.wav_scp.items()} == {u: inode[u] for u in kept}
    assert (narrowed.text, narrowed.utt2spk, narrowed.utt2num_samples, narrowed.spk2gender) == (
        data.text, data.utt2spk, data.utt2num_samples, data.spk2gender)
    assert yaml.safe_load((tmp_path / "all" / MARKER).read_text())["durations"] == [low - 1e-4, high + 1e-4]
    # nothing in range: an error naming the source, and the old DST left as it was
    with pytest.raises(InputError, match=r"pretrain/wav.scp: no utterance lasts 1000 to 2000 s"):
        format_data_dir(src, tmp_path / "dst", durations=(1000, 2000))
    assert read_data_dir(tmp_path / "dst").utts == everything.utts
    proc = subprocess.run(cmd[:-2], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--min_duration and --max_duration go together" in proc.stderr


def test_resampled_and_downmixed(tmp_path, prepared):
    """A 44.1 kHz stereo and an 8 kHz copy of real utterances come back as 16 kHz mono."""
    source = read_data_dir(prepared["librispeech"] / "dev")
    (u1, f1), (u2, f2) = sorted(source.wav_scp.items())[:2]
    conv = {u1: (tmp_path / "a.wav", ["-r", "44100", "-c", "2"]), u2: (tmp_path / "b.wav", ["-r", "8000"])}
    for utt, flac in ((u1, f1), (u2, f2)):
        subprocess.run(["sox", "-D", flac] + conv[utt][1] + [str(conv[utt][0])], check=True)
    src = tmp_path / "src"
    src.mkdir()
    DataDir({u: str(conv[u][0]) for u in conv}, {u: source.text[u] for u in conv},
            {u: source.utt2spk[u] for u in conv}).write(src)
    with pytest.raises(InputError, match="sample rate 44100, expected 16000"):
        validate_data_dir(src)
    data = check_formatted(src, format_data_dir(src, tmp_path / "dst"))
    for utt, flac in ((u1, f1), (u2, f2)):
        ref, _ = sf.read(flac, dtype="float32")
        got, _ = sf.read(data.wav_scp[utt], dtype="float32")
        assert abs(len(got) - len(ref)) <= 2
        n = min(len(got), len(ref))
        corr = np.corrcoef(ref[:n], got[:n])[0, 1]
        assert corr > (0.99 if utt == u1 else 0.5), (utt, corr)  # 8 kHz loses the upper band


def test_changed_source_is_rebuilt_and_foreign_dst_refused(tmp_path, prepared):
    src = tmp_path / "src"
    src.mkdir()
    read_data_dir(prepared["librispeech"] / "dev").write(src)
    dst = format_data_dir(src, tmp_path / "dst")
    text = (src / "text").read_text().splitlines()
    (src / "text").write_text("\n".join([text[0].split()[0] + " CHANGED TEXT"] + text[1:]) + "\n")
    format_data_dir(src, dst)
    assert (dst / "text").read_text().splitlines()[0].endswith(" CHANGED TEXT")

    utt, flac = sorted(read_data_dir(src).wav_scp.items())[0]
    copy = tmp_path / "copy.flac"
    shutil.copy(flac, copy)
    (src / "wav.scp").write_text((src / "wav.scp").read_text().replace(flac, str(copy)))
    format_data_dir(src, dst)
    subprocess.run(["sox", "-D", flac, str(copy), "trim", "0", "0.5"], check=True)  # new audio, same path
    format_data_dir(src, dst)
    assert read_data_dir(dst).utt2num_samples[utt] == 8000

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="not written by format_data_dir"):
        format_data_dir(src, foreign)
    assert (foreign / "keep.txt").read_text() == "user data"


def test_undecodable_audio_leaves_nothing(tmp_path, prepared):
    src = tmp_path / "src"
    src.mkdir()
    data = read_data_dir(prepared["librispeech"] / "sa_adapt")
    bad = tmp_path / "bad.flac"
    good = Path(sorted(data.wav_scp.values())[-1]).read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # header fine, stream truncated
    last = sorted(data.wav_scp)[-1]
    data.wav_scp[last] = str(bad)
    data.write(src)
    with pytest.raises(InputError, match=rf"{bad}: cannot decode audio"):
        format_data_dir(src, tmp_path / "dst", nj=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.flac", "src"]
    assert not (tmp_path / "dst" / MARKER).exists()

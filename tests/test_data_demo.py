"""The demo corpus synthesiser: layouts, text disjointness, determinism, distinct and consistent speakers."""
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from data_fixtures import TINY, TINY_SEED, librispeech_tree, synth_tiny, tedlium_tree, tree_digest  # noqa: F401
from pqm_ext.data.text import is_normalised, normalise_tedlium
from pqm_ext.demo.text import FORTUNES_MIN
from pqm_ext.demo.channel import Channel, finish
from pqm_ext.demo.layouts import noise_rng, render
from pqm_ext.demo.speakers import SpeakerSpec
from pqm_ext.demo.synth import DemoConfig, plan_corpus
from pqm_ext.demo.text import Sentence
from pqm_ext.demo.voices import Voice

N_TARGET = TINY["adapt_per_speaker"] + TINY["test_per_speaker"]


def librispeech_utts(root: Path) -> dict:
    """{utt: (subset, speaker, flac path, transcript)} read back from the tree."""
    utts = {}
    for trans in sorted((root / "LibriSpeech").glob("*/*/*/*.trans.txt")):
        subset, spk = trans.parts[-4], trans.parts[-3]
        for line in trans.read_text().splitlines():
            utt, text = line.split(" ", 1)
            utts[utt] = (subset, spk, trans.parent / f"{utt}.flac", text)
    return utts


def test_librispeech_tree(librispeech_tree):
    meta = yaml.safe_load((librispeech_tree / "speakers.yaml").read_text())
    roles = Counter(s["role"] for s in meta["speakers"])
    assert roles == {"target": 3, "pool": 2, "dev": 1}
    subset_of = {"target": "train-clean-360", "pool": "train-clean-100", "dev": "dev-clean"}
    per_role = {"target": N_TARGET, "pool": TINY["pool_per_speaker"], "dev": TINY["dev_per_speaker"]}
    utts = librispeech_utts(librispeech_tree)
    speakers_txt = {}
    for line in (librispeech_tree / "LibriSpeech/SPEAKERS.TXT").read_text().splitlines():
        if not line.startswith(";"):
            spk, sex, subset, minutes, name = (x.strip() for x in line.split("|"))
            speakers_txt[spk] = (sex, subset, float(minutes), name)
    assert sorted(speakers_txt) == sorted(s["id"] for s in meta["speakers"])
    for s in meta["speakers"]:
        assert s["id"].isdigit() and s["subset"] == subset_of[s["role"]]
        assert speakers_txt[s["id"]][:2] == (s["gender"].upper(), s["subset"])
        assert speakers_txt[s["id"]][3] == s["description"]
        assert {"engine", "name", "variant"} <= set(s["voice"]) and "noise" in s["channel"]
        mine = {u: v for u, v in utts.items() if v[1] == s["id"]}
        assert len(mine) == s["utterances"] == per_role[s["role"]]
        seconds = 0.0
        for utt, (subset, _, flac, text) in mine.items():
            assert subset == s["subset"] and re.fullmatch(rf"{s['id']}-\d+-\d{{4}}", utt) and is_normalised(text)
            info = sf.info(str(flac))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert 1.0 < info.duration < 15.0
            seconds += info.duration
        assert seconds == pytest.approx(s["seconds"], abs=0.02)
    assert len(list((librispeech_tree / "LibriSpeech").rglob("*.flac"))) == len(utts)
    assert set(meta["target_speakers"]) == {s["id"] for s in meta["speakers"] if s["role"] == "target"}


def test_target_and_dev_sentences_occur_once_and_never_in_pretraining_text(librispeech_tree):
    utts = librispeech_utts(librispeech_tree)
    count = Counter(text for _, _, _, text in utts.values())
    pretrain_text = {text for subset, _, _, text in utts.values() if subset == "train-clean-100"}
    held_out = [text for subset, _, _, text in utts.values() if subset != "train-clean-100"]
    assert len(held_out) == 3 * N_TARGET + TINY["dev_per_speaker"]
    for text in held_out:
        assert count[text] == 1, text  # so any adaptation/test split keeps test text unseen
        assert text not in pretrain_text


def test_tedlium_tree(tedlium_tree):
    meta = yaml.safe_load((tedlium_tree / "speakers.yaml").read_text())
    legacy = tedlium_tree / "TEDLIUM_release-3/legacy"
    by_subset = Counter(s["subset"] for s in meta["speakers"])
    assert by_subset == {"train": 5, "dev": 1, "test": 1}
    all_text = Counter()
    for s in meta["speakers"]:
        talk = s["id"]
        assert re.fullmatch(r"[A-Z][a-z]+[A-Z][a-z]+_\d{4}", talk)
        sph = legacy / s["subset"] / "sph" / f"{talk}.sph"
        info = sf.info(str(sph))
        assert (info.format, info.samplerate, info.channels) == ("NIST", 16000, 1)
        stm = legacy / s["subset"] / "stm" / f"{talk}.stm"
        rows = [line.split(maxsplit=6) for line in stm.read_text().splitlines()]
        assert rows[0][5:] == ["<o,f0,unknown>", "ignore_time_segment_in_scoring"]
        assert len(rows) - 1 == s["utterances"]
        last_end = float(rows[0][4])
        for rec, channel, spk, start, end, label, words in rows[1:]:
            assert (rec, channel, spk) == (talk, "1", talk)
            assert last_end <= float(start) < float(end) <= info.duration
            last_end = float(end)
            assert label == f"<o,f0,{'male' if s['gender'] == 'm' else 'female'}>"
            assert words == words.lower() and "'" not in words.replace(" '", "")  # contractions split
            all_text[normalise_tedlium(words)] += 1
    assert sum(all_text.values()) == 3 * N_TARGET + 2 * TINY["pool_per_speaker"] + 2 * TINY["dev_per_speaker"]


def test_same_seed_same_files(tmp_path, librispeech_tree, tedlium_tree):
    assert tree_digest(synth_tiny("librispeech", tmp_path / "ls")) == tree_digest(librispeech_tree)
    assert tree_digest(synth_tiny("tedlium3", tmp_path / "ted")) == tree_digest(tedlium_tree)
    other = synth_tiny("librispeech", tmp_path / "other", seed=TINY_SEED + 1)
    assert tree_digest(other) != tree_digest(librispeech_tree)


def test_complete_corpus_is_skipped_and_other_options_refused(librispeech_tree):
    flacs = sorted(librispeech_tree.rglob("*.flac"))
    before = [p.stat().st_mtime_ns for p in flacs]
    cmd = [sys.executable, "-m", "pqm_ext.bin.synth_demo_corpus", "--layout", "librispeech", "--out",
           str(librispeech_tree), "--seed", str(TINY_SEED)] + [f"--{k}={v}" for k, v in TINY.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "skipping" in proc.stderr, proc.stderr
    assert [p.stat().st_mtime_ns for p in flacs] == before
    proc = subprocess.run(cmd + ["--pool_per_speaker=4"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "made with other options" in proc.stderr
    assert [p.stat().st_mtime_ns for p in flacs] == before


def _spectrum(path: Path) -> np.ndarray:
    """Long-term log spectrum (32 bands up to 8 kHz) of the speech frames, level-normalised."""
    x, _ = sf.read(str(path), dtype="float32")
    frames = x[: len(x) // 512 * 512].reshape(-1, 512) * np.hanning(512)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    energy = power.sum(axis=1)
    power = power[energy > energy.max() * 1e-3].mean(axis=0)[1:257].reshape(32, 8).sum(axis=1)
    logp = np.log(power + 1e-10)
    return logp - logp.mean()


def test_speakers_are_consistent_and_distinct(librispeech_tree):
    """Leave-one-out nearest speaker centroid on long-term spectra: each speaker's voice and channel is
    the same in all its utterances and differs from the others'."""
    utts = librispeech_utts(librispeech_tree)
    feats = {u: _spectrum(v[2]) for u, v in utts.items()}
    spk_of = {u: v[1] for u, v in utts.items()}
    correct = 0
    for u, f in feats.items():
        centroids = {}
        for spk in set(spk_of.values()):
            others = [feats[w] for w in feats if spk_of[w] == spk and w != u]
            centroids[spk] = np.mean(others, axis=0)
        guess = min(centroids, key=lambda s: np.sum((centroids[s] - f) ** 2))
        correct += guess == spk_of[u]
    assert correct / len(feats) >= 0.9, f"{correct}/{len(feats)} utterances nearest to their own speaker"


def test_channel_band_limit_applies_to_speech_and_noise(tmp_path):
    spec = SpeakerSpec("target", Voice("flite", "rms", "m"), Channel(name="t", band=(0, 2000), noise="white", snr_db=5))
    sentence = Sentence("Steady movement is more important than speed.", "STEADY MOVEMENT IS MORE IMPORTANT THAN SPEED")
    x = render(spec, sentence, tmp_path)
    limited = finish(x, spec.channel, noise_rng(0, "u"), tmp_path)
    full = finish(x, Channel(name="t", noise="white", snr_db=5), noise_rng(0, "u"), tmp_path)

    def high_share(y):
        p = np.abs(np.fft.rfft(y.astype(np.float64))) ** 2
        return p[int(len(p) * 2500 / 8000):].sum() / p.sum()

    assert high_share(limited) < 0.01 < 0.1 < high_share(full)
    assert np.max(np.abs(limited)) == pytest.approx(10 ** (-3 / 20), rel=1e-3)


def test_text_pool_too_small_is_an_error():
    config = DemoConfig(layout="librispeech", num_target_speakers=40, adapt_per_speaker=20, test_per_speaker=15,
                        text_files=FORTUNES_MIN)  # 834 sentences for 40 x 35 unique target sentences
    with pytest.raises(ValueError, match="usable sentences"):
        plan_corpus(config)

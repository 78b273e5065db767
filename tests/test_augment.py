"""Multi-condition LoRA pretraining: the demo's noise and RIR lists, their checks, and ESPnet applying them.

The lists are real audio made by sox and numpy; the preprocessor is the one ESPnet builds for
``PQMASRTask`` from the tiny Conformer's (and Whisper's) arguments, run on real synthesised speech.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from pqm_ext.asr.augment import augment_lists, augment_record, check_audio_list
from pqm_ext.demo.noise_rir import NoiseRirConfig, synth_noise_rir
from pqm_ext.utils.errors import InputError

SMALL = NoiseRirConfig(noises_per_kind=1, noise_seconds=2.0, rirs=3)


@pytest.fixture(scope="module")
def noise_rir(tmp_path_factory):
    return synth_noise_rir(tmp_path_factory.mktemp("aug") / "noise_rir", SMALL)


def _e(path) -> str:
    return re.escape(str(path))


def test_the_demo_set_is_real_audio_deterministic_for_a_seed_and_made_once(noise_rir, tmp_path):
    noise_scp, rir_scp = noise_rir
    noises, rirs = check_audio_list(noise_scp), check_audio_list(rir_scp)
    assert [p.stem for p in noises] == ["white0", "pink0", "brown0", "hum0"]
    assert len(rirs) == 3
    for rir in rirs:  # a room: the direct impulse first, then a decaying tail that holds real energy
        h, rate = sf.read(str(rir))
        assert rate == 16000 and h.ndim == 1
        assert np.argmax(np.abs(h)) < 160
        tail = np.sum(h[800:] ** 2) / np.sum(h ** 2)  # after 50 ms
        assert 0.01 < tail < 0.99
    again = synth_noise_rir(tmp_path / "again", SMALL)
    for a, b in zip(noises + rirs, check_audio_list(again[0]) + check_audio_list(again[1])):
        assert a.read_bytes() == b.read_bytes()
    other = synth_noise_rir(tmp_path / "other", dataclasses.replace(SMALL, seed=1))
    assert check_audio_list(other[0])[0].read_bytes() != noises[0].read_bytes()
    mtime = noise_scp.stat().st_mtime_ns
    synth_noise_rir(noise_scp.parent, SMALL)  # complete for these options: left as it is
    assert noise_scp.stat().st_mtime_ns == mtime
    assert not [p for p in noise_scp.parent.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_directory_holding_anything_else_is_refused_not_replaced(noise_rir, tmp_path):
    """Another seed's set (or a user's own files) in the output directory stays as it was."""
    with pytest.raises(InputError, match=rf"^{_e(noise_rir[0].parent)}: holds something other than this noise"):
        synth_noise_rir(noise_rir[0].parent, dataclasses.replace(SMALL, seed=1))
    assert check_audio_list(noise_rir[0])  # untouched
    mine = tmp_path / "noise_rir"
    mine.mkdir()
    (mine / "my_noise.wav").write_bytes(b"RIFF")
    with pytest.raises(InputError, match="holds something other"):
        synth_noise_rir(mine, SMALL)
    assert (mine / "my_noise.wav").read_bytes() == b"RIFF"


BAD_LISTS = [  # (lines after a good first one, the line refused, what the error says)
    ([b"missing {d}/nowhere.wav"], 2, r"cannot read {d}/nowhere\.wav as audio"),
    ([b"x {d}/text.wav"], 2, r"cannot read {d}/text\.wav as audio"),
    ([b""], 2, "empty line"),
    # stereo or another rate would be mixed in as it is (ESPnet neither downmixes nor resamples there)
    ([b"s {d}/stereo.wav", b"n {d}/narrow.wav"], 2, r"{d}/stereo\.wav is 2 channel\(s\) at 16000 Hz"),
    ([b"n {d}/narrow.wav"], 2, r"{d}/narrow\.wav is 1 channel\(s\) at 8000 Hz"),
    ([b"x /tmp/caf\xe9.wav"], 2, "not UTF-8 text"),
]


@pytest.mark.parametrize("lines, line_no, message", BAD_LISTS)
def test_a_bad_list_is_refused_naming_the_file_and_line(noise_rir, tmp_path, lines, line_no, message):
    (tmp_path / "text.wav").write_text("not audio")
    sf.write(str(tmp_path / "stereo.wav"), np.zeros((1600, 2), np.float32), 16000)
    sf.write(str(tmp_path / "narrow.wav"), np.zeros(800, np.float32), 8000)
    bad = tmp_path / "noise.scp"
    good = noise_rir[0].read_bytes().splitlines()[0]
    bad.write_bytes(b"\n".join([good] + [x.replace(b"{d}", str(tmp_path).encode()) for x in lines]) + b"\n")
    with pytest.raises(InputError, match=rf"^{_e(bad)}:{line_no}: " + message.replace("{d}", _e(tmp_path))):
        check_audio_list(bad)


def test_a_missing_list_is_named(tmp_path):
    with pytest.raises(InputError, match=rf"^{_e(tmp_path / 'none.scp')}: no such file"):
        augment_record({"rir_scp": str(tmp_path / "none.scp")})


def test_the_lists_are_read_as_espnet_reads_its_options(noise_rir):
    """The config's list unless the command line sets one (abbreviated or not); ``none`` turns it off."""
    noise, rir = str(noise_rir[0]), str(noise_rir[1])
    assert augment_lists({"noise_scp": None, "rir_scp": None}) == {}
    assert augment_lists({"noise_scp": noise}) == {"noise_scp": [noise]}
    assert augment_lists({"noise_scp": "elsewhere.scp"}, ["--noise_scp", noise]) == {"noise_scp": [noise]}
    assert augment_lists({"noise_scp": noise}, ["--noise_scp", "none", "--rir_s", rir]) == {"rir_scp": [rir]}
    assert augment_lists({}, [f"--rir_scp={rir}", "--max_epoch", "3"]) == {"rir_scp": [rir]}


def test_the_adapter_record_follows_the_noise_files(noise_rir, tmp_path, conformer_model_dir):
    """A changed noise file (same list) must train the pretrained LoRA again; no lists, no record."""
    from pqm_ext.asr.train import training_plan

    (tmp_path / "lists").mkdir()
    noise_scp = tmp_path / "lists" / "noise.scp"
    copies = []
    for line in noise_rir[0].read_text().splitlines():
        name, path = line.split()
        copies.append(tmp_path / "lists" / f"{name}.wav")
        copies[-1].write_bytes(Path(path).read_bytes())
    noise_scp.write_text("".join(f"{p.stem} {p}\n" for p in copies))
    stage = tmp_path / "stage.yaml"
    stage.write_text(yaml.safe_dump({"lora_conf": {"rank": 1, "target_modules": ["linear_q"]}}))

    def plan(*extra):
        return training_plan(conformer_model_dir, [stage], tmp_path / "data", tmp_path / "data", tmp_path / "out",
                             extra_args=list(extra))[1]

    assert "augment" not in plan()
    first = plan("--noise_scp", str(noise_scp), "--rir_scp", str(noise_rir[1]))
    assert set(first["augment"]) == {"noise_scp", "rir_scp"}
    assert plan(f"--noise_scp={noise_scp}", "--rir_scp", str(noise_rir[1]))["augment"] == first["augment"]
    x, rate = sf.read(str(copies[0]))
    sf.write(str(copies[0]), x[::-1], rate, subtype="FLOAT")
    st = copies[0].stat()  # same size: make sure the digest cache sees a new file
    os.utime(copies[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    changed = plan("--noise_scp", str(noise_scp), "--rir_scp", str(noise_rir[1]))
    assert changed["augment"]["noise_scp"]["files"] != first["augment"]["noise_scp"]["files"]
    assert changed["augment"]["rir_scp"] == first["augment"]["rir_scp"]


def test_a_base_trained_with_noise_does_not_augment_speaker_adaptation(noise_rir, tmp_path, conformer_model_dir):
    """A base whose ESPnet config names noise/RIR lists (say one trained with them elsewhere): its LoRA trainings
    get none unless the stage asks, and an existing base's null entries leave the record as it was."""
    from pqm_ext.asr.train import training_plan

    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").symlink_to(conformer_model_dir / "model.safetensors")
    conf = yaml.safe_load((conformer_model_dir / "config.yaml").read_text())
    assert conf["noise_scp"] is None and conf["rir_scp"] is None  # ESPnet writes every option
    (base / "config.yaml").write_text(yaml.safe_dump(dict(conf, noise_scp=str(noise_rir[0]),
                                                          rir_scp="/elsewhere/rir.scp")))
    stage = tmp_path / "stage.yaml"
    stage.write_text(yaml.safe_dump({"lora_conf": {"rank": 1, "target_modules": ["linear_q"]}}))
    trained, made_from = training_plan(base, [stage], tmp_path / "d", tmp_path / "d", tmp_path / "out")
    assert trained["noise_scp"] is None and trained["rir_scp"] is None and "augment" not in made_from
    _, plain = training_plan(conformer_model_dir, [stage], tmp_path / "d", tmp_path / "d", tmp_path / "out")
    assert plain["config"]["noise_scp"] is None and "augment" not in plain


def test_a_bad_list_stops_stage_6_before_a_job_is_submitted(noise_rir, tmp_path, conformer_model_dir):
    """--check: 0 current, 1 would train, 2 bad input (pqm.sh then stops instead of launching the training)."""
    stage = tmp_path / "stage.yaml"
    stage.write_text(yaml.safe_dump({"lora_conf": {"rank": 1, "target_modules": ["linear_q"]}}))
    bad = tmp_path / "noise.scp"
    bad.write_text(f"x {tmp_path / 'nowhere.wav'}\n")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("wav.scp", "text", "utt2num_samples"):
        (data / name).write_text("")

    def check(model_dir, train_data, train_args):
        cmd = [sys.executable, "-m", "pqm_ext.bin.train_adapter", "--model_dir", str(model_dir),
               "--train_config", str(stage), "--train_data", str(train_data), "--valid_data", str(data),
               "--out", str(tmp_path / "out"), "--check", "--train_args", train_args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    res = check(conformer_model_dir, data, f"--noise_scp {bad}")
    assert res.returncode == 2 and f"{bad}:1: cannot read" in res.stderr
    res = check(conformer_model_dir, data, f"--noise_scp {noise_rir[0]}")
    assert res.returncode == 1, res.stderr[-2000:]
    # a missing data dir or base was "would train" (status 1), and a job that failed in the queue
    res = check(conformer_model_dir, tmp_path / "nowhere", "")
    assert res.returncode == 2 and f"{tmp_path / 'nowhere'}/wav.scp: missing" in res.stderr, res.stderr[-2000:]
    res = check(tmp_path, data, "")
    assert res.returncode == 2 and f"{tmp_path}/model.safetensors: model file (the quantised base: stage 5) not found" \
        in res.stderr, res.stderr[-2000:]


def _preprocess(args: argparse.Namespace, train: bool, data):
    from pqm_ext.tasks.pqm_asr import PQMASRTask

    state = np.random.get_state()
    np.random.seed(0)  # ESPnet draws the list entries, SNRs and whether to apply from numpy's global state
    try:
        return PQMASRTask.build_preprocess_fn(args, train=train)("u1", dict(data))
    finally:
        np.random.set_state(state)


def test_espnet_adds_the_noise_and_reverb_to_training_speech_only(noise_rir, conformer_args, speech):
    """The lists reach ESPnet's preprocessor through PQMASRTask's options: training utterances come out
    noisy at the asked SNR and reverberant, and mono; validation utterances come out as they went in."""
    wav = np.concatenate([speech[0], np.zeros(4800, np.float32)])  # 0.3 s of silence for the reverb to fill
    data = {"speech": wav, "text": "hello"}
    args = copy.deepcopy(conformer_args())
    args.noise_scp, args.noise_apply_prob, args.noise_db_range = str(noise_rir[0]), 1.0, "10"
    args.rir_scp, args.rir_apply_prob = None, 1.0
    noisy = _preprocess(args, True, data)["speech"]
    assert noisy.shape == wav.shape  # mono, as the models take it
    added = noisy - wav
    active = wav[np.abs(wav) > 0.01 * np.abs(wav).max()]  # roughly ESPnet's non-silence power
    snr = 10 * np.log10(np.mean(active.astype(np.float64) ** 2) / np.mean(added.astype(np.float64) ** 2))
    assert 7 < snr < 13
    np.testing.assert_array_equal(_preprocess(args, False, data)["speech"], wav)

    args.noise_scp, args.rir_scp = None, str(noise_rir[1])
    reverberant = _preprocess(args, True, data)["speech"]
    assert reverberant.shape == wav.shape
    tail = slice(len(wav) - 2400, len(wav))  # reverb smears the speech into the pause after it
    assert np.sum(reverberant[tail] ** 2) > 1e-4 * np.sum(reverberant ** 2) and not np.any(wav[tail])


def test_whisper_training_speech_stays_mono_and_its_targets_whispers(noise_rir, whisper_base_dir, speech):
    from whisper.tokenizer import get_tokenizer

    tok = get_tokenizer(multilingual=False)
    args = argparse.Namespace(**yaml.safe_load((whisper_base_dir / "config.yaml").read_text()))
    args.noise_scp, args.rir_scp, args.noise_apply_prob, args.rir_apply_prob = (str(noise_rir[0]), str(noise_rir[1]),
                                                                               1.0, 1.0)
    out = _preprocess(args, True, {"speech": speech[0], "text": "PLEASE CALL STELLA"})
    assert out["speech"].shape == speech[0].shape and not np.array_equal(out["speech"], speech[0])
    assert list(out["text"]) == [tok.no_timestamps] + tok.encode(" Please call stella")

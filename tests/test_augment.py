"""Multi-condition LoRA pretraining: the demo's noise and RIR lists, their checks, and ESPnet applying them.

The lists are real audio made by sox and numpy; the preprocessor is the one ESPnet builds for
``PQMASRTask`` from the tiny Conformer's arguments, run on real synthesised speech.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import soundfile as sf
import yaml

from pqm_ext.asr.augment import augment_record, check_audio_list
from pqm_ext.demo.noise_rir import NoiseRirConfig, synth_noise_rir
from pqm_ext.utils.errors import InputError

SMALL = NoiseRirConfig(noises_per_kind=1, noise_seconds=2.0, rirs=3)


@pytest.fixture(scope="module")
def noise_rir(tmp_path_factory):
    return synth_noise_rir(tmp_path_factory.mktemp("aug") / "noise_rir", SMALL)


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
    for a, b in zip(check_audio_list(noise_scp) + rirs, check_audio_list(again[0]) + check_audio_list(again[1])):
        assert a.read_bytes() == b.read_bytes()
    other = synth_noise_rir(tmp_path / "other", NoiseRirConfig(**{**SMALL.record(), "seed": 1,
                                                                 "reverberance": (20, 100), "room_scale": (30, 100)}))
    assert check_audio_list(other[0])[0].read_bytes() != noises[0].read_bytes()
    mtime = noise_scp.stat().st_mtime_ns
    synth_noise_rir(noise_scp.parent, SMALL)  # complete for these options: left as it is
    assert noise_scp.stat().st_mtime_ns == mtime
    assert not [p for p in noise_scp.parent.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_bad_list_is_refused_naming_the_file_and_line(noise_rir, tmp_path):
    good = noise_rir[0].read_text().splitlines()
    bad = tmp_path / "noise.scp"
    bad.write_text(f"{good[0]}\nmissing {tmp_path / 'nowhere.wav'}\n")
    with pytest.raises(InputError, match=rf"^{bad}:2: cannot read {tmp_path / 'nowhere.wav'} as audio"):
        check_audio_list(bad)
    (tmp_path / "text.wav").write_text("not audio")
    bad.write_text(f"x {tmp_path / 'text.wav'}\n")
    with pytest.raises(InputError, match=rf"^{bad}:1: cannot read .*text\.wav as audio"):
        check_audio_list(bad)
    bad.write_text(f"{good[0]}\n\n")
    with pytest.raises(InputError, match=rf"^{bad}:2: empty line"):
        check_audio_list(bad)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'none.scp'}: no such file"):
        augment_record({"rir_scp": str(tmp_path / "none.scp")})


def test_the_adapter_record_follows_the_noise_files(noise_rir, tmp_path, conformer_model_dir):
    """A changed noise file (same list) must train the pretrained LoRA again; no lists, no record."""
    from pqm_ext.asr.train import training_plan

    (tmp_path / "lists").mkdir()
    noise_scp = tmp_path / "lists" / "noise.scp"
    copies = []
    for line in noise_rir[0].read_text().splitlines():
        name, path = line.split()
        copies.append(tmp_path / "lists" / f"{name}.wav")
        copies[-1].write_bytes(open(path, "rb").read())
        with open(noise_scp, "a") as f:
            f.write(f"{name} {copies[-1]}\n")
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
    changed = plan("--noise_scp", str(noise_scp), "--rir_scp", str(noise_rir[1]))
    assert changed["augment"]["noise_scp"]["files"] != first["augment"]["noise_scp"]["files"]
    assert changed["augment"]["rir_scp"] == first["augment"]["rir_scp"]


def test_espnet_adds_the_noise_and_reverb_to_training_speech_only(noise_rir, conformer_args, speech):
    """The lists reach ESPnet's preprocessor through PQMASRTask's options: training utterances come out
    noisy at the asked SNR and reverberant; validation utterances come out as they went in."""
    from pqm_ext.tasks.pqm_asr import PQMASRTask

    wav, _ = speech
    data = {"speech": wav.astype(np.float32), "text": "hello"}
    args = copy.deepcopy(conformer_args())
    args.noise_scp, args.noise_apply_prob, args.noise_db_range = str(noise_rir[0]), 1.0, "10"
    args.rir_scp, args.rir_apply_prob = None, 1.0
    np.random.seed(0)
    noisy = PQMASRTask.build_preprocess_fn(args, train=True)("u1", dict(data))["speech"]
    assert noisy.shape == wav.shape and noisy.dtype == np.float32  # mono, as the models take it
    added = noisy - wav
    active = wav[np.abs(wav) > 0.01 * np.abs(wav).max()]  # roughly ESPnet's non-silence power
    snr = 10 * np.log10(np.mean(active.astype(np.float64) ** 2) / np.mean(added.astype(np.float64) ** 2))
    assert 7 < snr < 13
    clean = PQMASRTask.build_preprocess_fn(args, train=False)("u1", dict(data))["speech"]
    np.testing.assert_array_equal(clean, wav)

    args.noise_scp, args.rir_scp = None, str(noise_rir[1])
    reverberant = PQMASRTask.build_preprocess_fn(args, train=True)("u1", dict(data))["speech"]
    assert reverberant.shape == wav.shape
    # reverb smears the speech into its pauses: more energy in the trailing silence than before
    tail = slice(len(wav) - 2400, len(wav))
    assert np.sum(reverberant[tail] ** 2) > 10 * np.sum(wav[tail] ** 2) + 1e-6

"""Data-dir validation: each broken file is reported with its name and line."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pqm_ext.data.kaldi_dir import DataDir, Segment, read_data_dir, validate_data_dir
from pqm_ext.utils.errors import InputError


def _audio(path: Path, seconds: float, rate: int = 16000, seed: int = 0) -> str:
    x = np.random.default_rng(seed).standard_normal(int(seconds * rate)).astype(np.float32) * 0.1
    sf.write(str(path), x, rate, subtype="PCM_16")
    return str(path)


def make_dir(root: Path, segments: bool = False) -> Path:
    """A valid data dir of three utterances by speakers A and B, with real flac/wav audio."""
    audio = root / "audio"
    audio.mkdir()
    d = root / "data"
    d.mkdir()
    text = {"A-1": "HELLO THERE", "A-2": "IT'S ME", "B-1": "GOOD BYE"}
    utt2spk = {"A-1": "A", "A-2": "A", "B-1": "B"}
    if segments:
        wav = {"recA": _audio(audio / "recA.wav", 3.0), "recB": _audio(audio / "recB.wav", 2.0, seed=1)}
        segs = {"A-1": Segment("recA", 0.0, 1.2), "A-2": Segment("recA", 1.5, 2.9), "B-1": Segment("recB", 0.1, 1.0)}
        DataDir(wav, text, utt2spk, segments=segs).write(d)
    else:
        wav = {u: _audio(audio / f"{u}.flac", 0.5, seed=i) for i, u in enumerate(text)}
        DataDir(wav, text, utt2spk, utt2num_samples={u: 8000 for u in text}, spk2gender={"A": "f", "B": "m"}).write(d)
    return d


def lines(d: Path, name: str) -> list:
    return (d / name).read_text().splitlines()


def put(d: Path, name: str, rows: list) -> None:
    (d / name).write_text("".join(r + "\n" for r in rows))


def test_valid_dirs_round_trip(tmp_path):
    d = make_dir(tmp_path)
    data = validate_data_dir(d, check_audio="decode")
    assert data.utts == ["A-1", "A-2", "B-1"] and data.spk2utt() == {"A": ["A-1", "A-2"], "B": ["B-1"]}
    assert lines(d, "spk2utt") == ["A A-1 A-2", "B B-1"]
    sub = data.subset(["B-1"])
    assert sub.speakers == ["B"] and list(sub.wav_scp) == ["B-1"] and sub.spk2gender == {"B": "m"}

    (tmp_path / "seg").mkdir()
    s = make_dir(tmp_path / "seg", segments=True)
    segs = validate_data_dir(s, check_audio="header")
    assert segs.segments["A-2"] == Segment("recA", 1.5, 2.9)
    assert segs.subset(["B-1"]).wav_scp == {"recB": segs.wav_scp["recB"]}


def _swap_text(d):
    t = lines(d, "text")
    put(d, "text", [t[1], t[0], t[2]])


# (mutation, segments dir?, expected message fragment with file:line)
CASES = {
    "unsorted": (_swap_text, False, "text:2: not sorted in C-locale order: 'A-1' after 'A-2'"),
    "duplicate": (lambda d: put(d, "utt2spk", lines(d, "utt2spk")[:2] + ["A-2 A"] + lines(d, "utt2spk")[2:]), False,
                  "utt2spk:3: duplicate id 'A-2' (first on line 2)"),
    "empty text": (lambda d: put(d, "text", ["A-1 HELLO THERE", "A-2", "B-1 GOOD BYE"]), False,
                   "text:2: 'A-2' has no transcript"),
    "missing text": (lambda d: put(d, "text", lines(d, "text")[:2]), False,
                     "utt2spk:3: utterance 'B-1' has no line in text"),
    "extra text": (lambda d: put(d, "text", lines(d, "text") + ["C-1 EXTRA"]), False,
                   "text:4: utterance 'C-1' has no line in utt2spk"),
    "not normalised": (lambda d: put(d, "text", ["A-1 hello there"] + lines(d, "text")[1:]), False,
                       "text:1: transcript of 'A-1' is not normalised"),
    "speaker prefix": (lambda d: put(d, "utt2spk", ["A-1 A", "A-2 B", "B-1 B"]), False,
                       "utt2spk:2: utterance id 'A-2' does not start with its speaker id 'B'"),
    "spk2utt": (lambda d: put(d, "spk2utt", ["A A-1", "B B-1"]), False,
                "spk2utt: utterance 'A-2' of utt2spk is not listed"),
    "no wav": (lambda d: put(d, "wav.scp", ["A-1 /nonexistent/A-1.flac"] + lines(d, "wav.scp")[1:]), False,
               "wav.scp:1: recording 'A-1' (/nonexistent/A-1.flac): audio file does not exist"),
    "pipe": (lambda d: put(d, "wav.scp", ["A-1 sph2pipe -f wav x.sph |"] + lines(d, "wav.scp")[1:]), False,
             "wav.scp:1: only plain audio paths are supported"),
    "8 kHz": (lambda d: _audio(Path(read_data_dir(d).wav_scp["A-2"]), 0.5, rate=8000), False,
              "wav.scp:2: recording 'A-2'"),
    "utt2num_samples": (lambda d: put(d, "utt2num_samples", ["A-1 8000", "A-2 7999", "B-1 8000"]), False,
                        "wav.scp:2: recording 'A-2'"),
    "gender": (lambda d: put(d, "spk2gender", ["A f", "B x"]), False, "spk2gender:2: gender must be 'm' or 'f'"),
    "segment past end": (lambda d: put(d, "segments", ["A-1 recA 0 1.2", "A-2 recA 1.5 3.6", "B-1 recB 0.1 1"]),
                         True, "wav.scp:1: recording 'recA'"),
    "segment times": (lambda d: put(d, "segments", ["A-1 recA 0 1.2", "A-2 recA 2.0 1.5", "B-1 recB 0.1 1"]),
                      True, "segments:2: bad times 2.0 1.5"),
    "segment recording": (lambda d: put(d, "segments", ["A-1 recA 0 1.2", "A-2 recC 1.5 2.9", "B-1 recB 0.1 1"]),
                          True, "segments:2: recording 'recC' is not in wav.scp"),
    "missing file": (lambda d: (d / "spk2utt").unlink(), False, "spk2utt: missing"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_broken_dir_names_file_and_line(tmp_path, name):
    mutate, segments, message = CASES[name]
    d = make_dir(tmp_path, segments=segments)
    validate_data_dir(d)  # valid before the mutation
    mutate(d)
    with pytest.raises(InputError) as e:
        validate_data_dir(d, check_audio="header")
    assert message in str(e.value)
    assert str(e.value).startswith(str(d)), "the message starts with the offending file"


def test_sample_rate_message_and_resampling_allowed(tmp_path):
    d = make_dir(tmp_path)
    _audio(Path(read_data_dir(d).wav_scp["A-2"]), 0.5, rate=8000)
    with pytest.raises(InputError, match="sample rate 8000, expected 16000"):
        validate_data_dir(d)
    put(d, "utt2num_samples", ["A-1 8000", "A-2 4000", "B-1 8000"])
    validate_data_dir(d, allow_resample=True)


def test_speaker_order_must_follow_utterance_order(tmp_path):
    d = make_dir(tmp_path)
    wav = read_data_dir(d).wav_scp
    # 'a+b-1' sorts before 'a-1' ('+' < '-') but its speaker 'a+b' sorts after 'a'.
    DataDir({"a+b-1": wav["A-1"], "a-1": wav["A-2"]}, {"a+b-1": "ONE", "a-1": "TWO"},
            {"a+b-1": "a+b", "a-1": "a"}).write(d)
    (d / "utt2num_samples").unlink()
    (d / "spk2gender").unlink()
    with pytest.raises(InputError, match=r"utt2spk:2: speaker 'a' of 'a-1' sorts before speaker 'a\+b'"):
        validate_data_dir(d)


def test_truncated_flac_fails_only_when_decoded(tmp_path):
    d = make_dir(tmp_path)
    flac = Path(read_data_dir(d).wav_scp["B-1"])
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    validate_data_dir(d, check_audio="header")  # the header is intact
    with pytest.raises(InputError, match=r"wav.scp:3: recording 'B-1' .*cannot decode audio"):
        validate_data_dir(d, check_audio="decode")

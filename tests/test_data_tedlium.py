"""egs/tedlium3_sa/local/data.sh on a synthesised TED-LIUM 3 tree: segments, held-out talks, splits,
determinism and the bad inputs it must refuse without leaving a partial data dir."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from data_fixtures import (OUTPUTS, REPO, SPLIT_ARGS, TINY, TINY_SEED, assert_no_outputs, copy_tree,  # noqa: F401
                           run_data_sh, tedlium_tree, tree_digest)
from pqm_ext.data.kaldi_dir import DataDir, Segment, read_data_dir, validate_data_dir
from pqm_ext.data.tedlium import pad_segments, talk_person
from pqm_ext.data.text import normalise_tedlium

TED = "tedlium3"


def prepare(tmp_path: Path, corpus: Path, *args: str, name: str = "data"):
    proc = run_data_sh(TED, tmp_path, "--data_dir", name, *(args or SPLIT_ARGS), corpus=corpus)
    return proc, tmp_path / name


def stm_segments(corpus: Path, subset: str) -> dict:
    """{talk: [(start, end, words)]} of the scored segments of a subset's stm files."""
    out = {}
    for stm in sorted((corpus / "TEDLIUM_release-3/legacy" / subset / "stm").glob("*.stm")):
        rows = [line.split(maxsplit=6) for line in stm.read_text().splitlines()]
        out[stm.stem] = [(float(r[3]), float(r[4]), r[6]) for r in rows if r[6] != "ignore_time_segment_in_scoring"]
    return out


def test_data_sh_writes_valid_dirs_with_segments(tmp_path, tedlium_tree):
    proc, data = prepare(tmp_path, tedlium_tree)
    assert proc.returncode == 0, proc.stderr
    assert "dropped 5 ignore_time_segment_in_scoring" in proc.stderr  # one lead-in per train talk
    meta = yaml.safe_load((tedlium_tree / "speakers.yaml").read_text())
    role = {s["id"]: s["role"] for s in meta["speakers"]}
    train, dev = stm_segments(tedlium_tree, "train"), stm_segments(tedlium_tree, "dev")
    dirs = {name: validate_data_dir(data / name, check_audio="decode") for name in OUTPUTS[:4]}
    targets = dirs["sa_test"].speakers
    # Held-out talks: 2 of the 3 target talks (the pool talks have too few segments to be drawn).
    assert len(targets) == 2 and {role[t] for t in targets} == {"target"} and dirs["sa_adapt"].speakers == targets
    assert dirs["pretrain"].speakers == sorted(set(train) - set(targets))
    assert dirs["dev"].speakers == sorted(dev)
    gender = {s["id"]: s["gender"] for s in meta["speakers"]}
    assert all(d.spk2gender == {t: gender[t] for t in d.speakers} for d in dirs.values())
    for name, d in dirs.items():
        assert d.segments is not None and set(d.wav_scp) == set(d.speakers)  # talks are recordings and speakers
        for talk, path in d.wav_scp.items():
            assert path.endswith(f"/legacy/{'dev' if name == 'dev' else 'train'}/sph/{talk}.sph")
        for utt, seg in d.segments.items():
            talk = d.utt2spk[utt]
            stm = {f"{talk}-{round(s * 100):07d}-{round(e * 100):07d}": (s, e, w)
                   for s, e, w in (train if name != "dev" else dev)[talk]}
            start, end, words = stm[utt]  # the id keeps the stm times ...
            assert seg.recording == talk and d.text[utt] == normalise_tedlium(words)
            if name == "dev":
                assert (seg.start, seg.end) == (start, end)
            else:  # ... the segment is padded as Kaldi pads it (0.15 s before, 0.1 s after), never overlapping
                assert start - 0.15 - 1e-9 <= seg.start <= start and end <= seg.end <= end + 0.1 + 1e-9
        if name != "dev":
            for talk in d.speakers:
                times = sorted((seg.start, seg.end) for u, seg in d.segments.items() if d.utt2spk[u] == talk)
                assert all(a[1] <= b[0] for a, b in zip(times, times[1:]))
                assert any(e - s > 0 for s, e in times)
    assert len(dirs["pretrain"].utt2spk) == sum(len(train[t]) for t in dirs["pretrain"].speakers)
    assert len(dirs["dev"].utt2spk) == sum(len(v) for v in dev.values())

    for talk in targets:
        adapt = (data / "sa_splits" / f"{talk}.adapt").read_text().split()
        test = (data / "sa_splits" / f"{talk}.test").read_text().split()
        assert len(adapt) == 4 and len(test) == 3 and not set(adapt) & set(test)
        assert set(adapt) <= set(dirs["sa_adapt"].utt2spk) and set(test) <= set(dirs["sa_test"].utt2spk)
    test_text = set(dirs["sa_test"].text.values())
    assert not test_text & (set(dirs["sa_adapt"].text.values()) | set(dirs["pretrain"].text.values()))
    assert any("'" in t for d in dirs.values() for t in d.text.values()), "contractions are joined back"


def test_same_seed_same_dirs(tmp_path, tedlium_tree):
    a = prepare(tmp_path, tedlium_tree, *SPLIT_ARGS, "--seed", "1", name="a")[1]
    b = prepare(tmp_path, tedlium_tree, *SPLIT_ARGS, "--seed", "1", name="b")[1]
    c = prepare(tmp_path, tedlium_tree, *SPLIT_ARGS, "--seed", "2", name="c")[1]
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)


def test_data_prepared_by_an_older_reader_is_prepared_again(tmp_path, tedlium_tree):
    """A fix to the reader changes what it writes from the same corpus and options: a data dir it made before
    (no reader version recorded: version 1) must not be kept as if it were complete."""
    proc, data = prepare(tmp_path, tedlium_tree)
    assert proc.returncode == 0, proc.stderr
    marker = data / "sa_splits/prepare.yaml"
    record = yaml.safe_load(marker.read_text())
    assert record["reader"] >= 2
    assert "complete for these options: skipping" in prepare(tmp_path, tedlium_tree)[0].stderr
    del record["reader"]
    marker.write_text(yaml.safe_dump(record, sort_keys=False))
    proc = prepare(tmp_path, tedlium_tree)[0]
    assert proc.returncode == 0 and "prepared by version 1 of the corpus reader" in proc.stderr, proc.stderr
    assert yaml.safe_load(marker.read_text())["reader"] >= 2


def test_sa_talks_from_legacy_test(tmp_path, tedlium_tree):
    test_talk = sorted(stm_segments(tedlium_tree, "test"))[0]
    proc, data = prepare(tmp_path, tedlium_tree, "--sa_subsets", "train test", "--target_speakers", test_talk,
                         "--num_test", "1", "--max_adapt", "1")
    assert proc.returncode == 0, proc.stderr
    assert validate_data_dir(data / "sa_test").speakers == [test_talk]
    assert test_talk not in validate_data_dir(data / "pretrain").speakers


def _stm(root: Path, subset: str = "train") -> Path:
    return sorted((root / "TEDLIUM_release-3/legacy" / subset / "stm").glob("*.stm"))[0]


def _sph(root: Path, subset: str = "train") -> Path:
    stm = _stm(root, subset)
    return stm.parent.parent / "sph" / f"{stm.stem}.sph"


def _edit_stm(root: Path, edit) -> None:
    stm = _stm(root)
    rows = stm.read_text().splitlines()
    stm.write_text("\n".join(edit(rows)) + "\n")


def _with_times(row: str, start: str, end: str) -> str:
    f = row.split(" ", 5)
    return " ".join(f[:3] + [start, end, f[5]])


BAD = {
    "subset missing": (lambda r: shutil.rmtree(r / "TEDLIUM_release-3/legacy/dev/stm"),
                       "legacy/dev/stm: subset 'dev' missing"),
    "sph missing": (lambda r: _sph(r).unlink(), "{stm}: no audio for this talk"),
    "sph does not decode": (lambda r: _sph(r).write_bytes(b"NIST_1A garbage" * 50), ".sph: cannot read audio header"),
    "not UTF-8": (lambda r: _stm(r).write_bytes(_stm(r).read_bytes().replace(b" ", b" caf\xe9 ", 1)),
                  "{stm}:1: not UTF-8 text (byte 0xe9"),
    "duplicate segment": (lambda r: _edit_stm(r, lambda rows: rows[:3] + [rows[2]] + rows[3:]),
                          "{stm}:4: duplicate utterance id"),
    "bad times": (lambda r: _edit_stm(r, lambda rows: rows[:1] + [_with_times(rows[1], "3.00", "0.50")] + rows[2:]),
                  "{stm}:2: bad times 3.0 0.5"),
    "segment past the audio": (lambda r: _edit_stm(r, lambda rows: rows + [_with_times(rows[-1], "900.00", "901.00")]),
                               "ends at 901.1 s, after the end of the recording"),  # 901.0 + 0.1 s padding
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_corpus_fails_clearly_without_partial_output(tmp_path, tedlium_tree, name):
    corrupt, message = BAD[name]
    corpus = copy_tree(tedlium_tree, tmp_path / "corpus")
    stm = _stm(corpus)
    corrupt(corpus)
    proc, data = prepare(tmp_path, corpus)
    assert proc.returncode == 1
    assert message.format(stm=stm) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_outputs(data)


def test_talk_with_too_few_segments(tmp_path, tedlium_tree):
    proc, data = prepare(tmp_path, tedlium_tree, "--num_target_speakers", "4", "--max_adapt", "4", "--num_test", "3")
    assert proc.returncode == 1
    assert "only 3 of 5 speakers have at least 7 utterances" in proc.stderr and "fewer than the 4" in proc.stderr
    assert_no_outputs(data)


def test_corpus_variable_empty(tmp_path):
    proc = run_data_sh(TED, tmp_path, *SPLIT_ARGS)
    assert proc.returncode == 1 and "TEDLIUM3 is empty: set it in db.sh" in proc.stderr
    proc = run_data_sh(TED, tmp_path, *SPLIT_ARGS, env={"TEDLIUM3": str(tmp_path / "none")})
    assert proc.returncode == 1 and f"TEDLIUM3={tmp_path / 'none'}: no such directory" in proc.stderr
    assert_no_outputs(tmp_path / "data")


def _rewrite(stm: Path, edit) -> None:
    rows = [r.split(" ") for r in stm.read_text().splitlines()]
    stm.write_text("".join(" ".join(edit(i, r)) + "\n" for i, r in enumerate(rows)))


def test_the_real_releases_stm_conventions(tmp_path, tedlium_tree):
    """What TED-LIUM 3's own stm files hold and the demo's do not: a person giving several talks, <unk>
    (also before a split suffix), digits, and the labels <NA> (train) and <F0_M>/<F0_F> (legacy dev)."""
    corpus = copy_tree(tedlium_tree, tmp_path / "corpus")
    legacy = corpus / "TEDLIUM_release-3/legacy"
    meta = yaml.safe_load((corpus / "speakers.yaml").read_text())
    role = {s["id"]: s["role"] for s in meta["speakers"]}
    gender = {s["id"]: s["gender"] for s in meta["speakers"]}
    targets = sorted(t for t in stm_segments(corpus, "train") if role[t] == "target")
    pool = sorted(t for t in stm_segments(corpus, "train") if role[t] != "target")
    target, other_talk, same_person = targets[0], targets[1], pool[0]
    # The target and a pool talk are given by the same person; TED-LIUM 3's train labels are <NA>.
    for talk in (target, same_person):
        _rewrite(legacy / "train/stm" / f"{talk}.stm", lambda i, r: r[:2] + ["SamePerson"] + r[3:5] + ["<NA>"] + r[6:])
    # Another talk by the target's speaker, whose stm gives the talk id as the speaker: only its name says so.
    namesake = f"{talk_person(other_talk)}_1999X"
    for kind in ("stm", "sph"):
        (legacy / f"train/{kind}/{namesake}.{kind}").write_bytes((legacy / f"train/{kind}/{pool[1]}.{kind}").read_bytes())
    _rewrite(legacy / f"train/stm/{namesake}.stm", lambda i, r: [namesake, r[1], namesake] + r[3:])
    # A zero-length <NA> line to ignore (dropped before its times are looked at), one target segment with
    # <unk> before a split suffix, one pool segment with a digit, one with release 1's trailing utterance key.
    stm = legacy / "train/stm" / f"{same_person}.stm"
    stm.write_text(stm.read_text() + f"{same_person} 1 inter_segment_gap 900.00 900.00 <NA> ignore_time_segment_in_scoring\n")
    _rewrite(legacy / "train/stm" / f"{pool[1]}.stm", lambda i, r: r + [f"({pool[1]}-{i})"] if i == 2 else r)
    _rewrite(legacy / "train/stm" / f"{target}.stm", lambda i, r: r[:7] + ["<unk>", "'s"] + r[7:] if i == 1 else r)
    # The digit segment ends 0.1 s before the next one starts, so padding that one must stop halfway.
    next_start = stm_segments(tedlium_tree, "train")[pool[1]][1][0]
    _rewrite(legacy / "train/stm" / f"{pool[1]}.stm",
             lambda i, r: r[:4] + [f"{next_start - 0.1:.2f}"] + r[5:7] + ["co", "2"] + r[7:] if i == 1 else r)
    for dev_stm in (legacy / "dev/stm").glob("*.stm"):
        mark = "<F0_M>" if gender[dev_stm.stem] == "m" else "<F0_F>"
        _rewrite(dev_stm, lambda i, r: r[:5] + [mark] + r[6:])
    proc, data = prepare(tmp_path, corpus, "--target_speakers", f"{target} {other_talk}", "--max_adapt", "3", "--num_test", "3")
    assert proc.returncode == 0, proc.stderr
    dirs = {name: validate_data_dir(data / name) for name in OUTPUTS[:4]}
    # The pool keeps no talk of a target's speaker, and says so.
    assert same_person not in dirs["pretrain"].speakers and pool[1] in dirs["pretrain"].speakers
    assert namesake not in dirs["pretrain"].speakers
    assert f"same speakers as a target talk: {' '.join(sorted([namesake, same_person]))}" in proc.stderr
    # The utterance key is not a word, and the segment stays.
    keyed = sorted(u for u, spk in dirs["pretrain"].utt2spk.items() if spk == pool[1])
    assert len(keyed) == len(stm_segments(tedlium_tree, "train")[pool[1]]) - 1  # less the one with a digit
    # Padding stops halfway to the segment left out for its digit (pool[1]'s first scored one): its speech is
    # in no reference. Without it, the next segment would get the full 0.15 s.
    (_, d_end, _), (start, end, _) = stm_segments(corpus, "train")[pool[1]][:2]
    padded = read_data_dir(tmp_path / "data/pretrain").segments[f"{pool[1]}-{round(start * 100):07d}-{round(end * 100):07d}"]
    assert padded.start == pytest.approx(round((d_end + start) / 2, 3))
    # The <unk> segment is no SA candidate; the ignore line and the digit segment are nowhere.
    unk_utt = [u for u, spk in dirs["sa_adapt"].utt2spk.items() if spk == target]
    first = stm_segments(tedlium_tree, "train")[target][0]
    unk_id = f"{target}-{round(first[0] * 100):07d}-{round(first[1] * 100):07d}"
    assert len(unk_utt) == 3 and unk_id not in dirs["sa_adapt"].utt2spk and unk_id not in dirs["sa_test"].utt2spk
    texts = [t for d in dirs.values() for t in d.text.values()]
    assert not any("IGNORE" in t or t.startswith("CO ") for t in texts)
    ignored = len(targets) + len(pool) + 2  # the demo's lead-in of every talk and the namesake's, the <NA> line
    assert f"dropped {ignored} ignore_time_segment_in_scoring, 1 with digits, 0 without words; 1 with <unk>" \
        in proc.stderr, proc.stderr
    # Dev's <F0_M>/<F0_F> are labels that give the talk's gender, not words.
    assert dirs["dev"].spk2gender == {t: gender[t] for t in dirs["dev"].speakers}
    assert not any(w.startswith("F") and "0" in w for t in dirs["dev"].text.values() for w in t.split())


def test_segments_are_padded_like_kaldis_extend_segment_times():
    seg = {"a": Segment("t", 0.05, 1.0), "b": Segment("t", 1.05, 2.0), "c": Segment("t", 3.0, 4.0),
           "d": Segment("t", 3.9, 5.0), "e": Segment("u", 1.0, 2.0)}
    data = DataDir(wav_scp={"t": "t.sph", "u": "u.sph"}, text={u: "X" for u in seg},
                   utt2spk={u: "t" for u in seg}, segments=dict(seg))
    pad_segments(data, 0.15, 0.1)
    assert data.segments == {
        "a": Segment("t", 0.0, 1.025),    # not below 0; halfway to b
        "b": Segment("t", 1.025, 2.1),    # halfway to a; full padding after
        "c": Segment("t", 2.85, 4.0),     # full padding before; overlaps d already: its end stays
        "d": Segment("t", 3.9, 5.1),
        "e": Segment("u", 0.85, 2.1),     # another recording: its own neighbours
    }


def test_a_segment_left_out_is_a_neighbour_that_padding_stops_at():
    """A segment dropped for its digits was spoken: padding its neighbours into it would give them words
    that are in no reference. Without it, the two segments are 2 s apart and get the full padding."""
    seg = {"a": Segment("t", 10.0, 12.0), "c": Segment("t", 14.0, 16.0)}
    data = DataDir(wav_scp={"t": "t.sph"}, text={u: "X" for u in seg}, utt2spk={u: "t" for u in seg},
                   segments=dict(seg))
    pad_segments(data, 0.15, 0.1, dropped={"t": [(12.0, 14.0)], "other": [(0.0, 1.0)]})
    assert data.segments == {"a": Segment("t", 9.85, 12.0), "c": Segment("t", 14.0, 16.1)}
    # Nested or overlapping spans: no side is padded into another span, however far back it started.
    nested = {"a": Segment("t", 5.0, 6.0), "b": Segment("t", 21.05, 25.0)}
    data = DataDir(wav_scp={"t": "t.sph"}, text={u: "X" for u in nested}, utt2spk={u: "t" for u in nested},
                   segments=dict(nested))
    pad_segments(data, 0.15, 0.1, dropped={"t": [(0.0, 21.0), (5.5, 5.8)]})
    assert data.segments == {"a": Segment("t", 5.0, 6.0), "b": Segment("t", 21.025, 25.1)}
    pad_segments(alone := DataDir(wav_scp={"t": "t.sph"}, text={u: "X" for u in seg},
                                  utt2spk={u: "t" for u in seg}, segments=dict(seg)), 0.15, 0.1)
    assert alone.segments == {"a": Segment("t", 9.85, 12.1), "c": Segment("t", 13.85, 16.1)}


def test_run_sh_pads_a_corpus_given_as_corpus_dir_but_not_its_own_demo(tmp_path, tedlium_tree):
    """The synthesised talks' stm times already hold silence, so run.sh turns Kaldi's padding off for them;
    a real TED-LIUM 3 given on the command line (``--corpus_dir``, not db.sh) must still be padded."""
    recipe = tmp_path / "tedlium3_sa"
    recipe.mkdir()
    for name, target in [("run.sh", "egs/tedlium3_sa/run.sh"), ("pqm.sh", "egs/TEMPLATE/pqm.sh"),
                         ("path.sh", "egs/TEMPLATE/path.sh"), ("cmd.sh", "egs/TEMPLATE/cmd.sh"),
                         ("conf", "egs/TEMPLATE/conf"), ("utils", "utils"), ("local", "egs/tedlium3_sa/local")]:
        (recipe / name).symlink_to(REPO / target)
    (recipe / "db.sh").write_text("TEDLIUM3=\n")
    corpus = copy_tree(tedlium_tree, tmp_path / "corpus")
    tiny = " ".join(f"--{k} {v}" for k, v in TINY.items())  # the fixture's corpus: synthesis finds it complete
    common = ["--stage", "1", "--stop_stage", "1", "--seed", str(TINY_SEED), "--data_opts", " ".join(SPLIT_ARGS)]
    env = {k: v for k, v in os.environ.items() if k != "TEDLIUM3"}

    def run(*args):
        res = subprocess.run(["./run.sh", *common, *args], cwd=recipe, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]

    before = tree_digest(corpus)
    run("--demo_dir", str(corpus), "--demo_opts", tiny, "--datadir", "demo_data")
    assert tree_digest(corpus) == before  # not synthesised again
    run("--corpus_dir", str(corpus), "--datadir", "real_data")
    stm = {(talk, round(start, 2)) for subset in ("train", "dev", "test")
           for talk, rows in stm_segments(corpus, subset).items() for start, _, _ in rows}
    demo, real = (read_data_dir(recipe / d / "sa_adapt") for d in ("demo_data", "real_data"))
    assert demo.segments.keys() == real.segments.keys()
    assert {(s.recording, round(s.start, 2)) for s in demo.segments.values()} <= stm  # as the stm gives them
    assert all(real.segments[u].start < s.start or s.start == 0 for u, s in demo.segments.items())  # padded

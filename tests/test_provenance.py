"""Records of what a unit of work was made from: when a re-run may reuse it, and what it says otherwise."""
from __future__ import annotations

import json
import logging
import os

import torch

from pqm_ext.asr.train import MADE_FROM, discard_checkpoint_of_other_inputs
from pqm_ext.utils.provenance import changes, file_digest, reusable


def test_a_record_with_the_same_inputs_is_reused_in_any_json_spelling(caplog):
    wanted = {"config": {"lr": 0.005, "target_modules": ("q", "v")}, "base": "ab12"}
    recorded = json.loads(json.dumps(wanted))  # as read back from a file: the tuple is now a list
    with caplog.at_level(logging.WARNING):
        assert reusable(recorded, wanted, "exp/x/adapter")
    assert caplog.records == []


def test_a_changed_input_is_named_in_the_warning(caplog):
    recorded = {"config": {"optim_conf": {"lr": 0.001}, "max_epoch": 3}, "base": "ab12"}
    wanted = {"config": {"optim_conf": {"lr": 0.005}, "max_epoch": 3}, "base": "ab12"}
    with caplog.at_level(logging.WARNING):
        assert not reusable(recorded, wanted, "exp/x/adapter")
    assert "exp/x/adapter was made from other inputs" in caplog.text
    assert "config.optim_conf.lr: 0.001 -> 0.005" in caplog.text and "max_epoch" not in caplog.text


def test_a_unit_without_a_record_is_made_again(caplog):
    with caplog.at_level(logging.WARNING):
        assert not reusable(None, {"base": "ab12"}, "exp/x/nf4")
    assert "exp/x/nf4: no record of what it was made from" in caplog.text


def test_changes_lists_added_and_removed_keys():
    assert changes({"a": 1, "b": {"c": 2}}, {"a": 1, "d": 3}) == ["b.c: 2 -> (none)", "d: (none) -> 3"]


def test_file_digest_follows_the_content(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"one")
    first = file_digest(f)
    assert file_digest(f) == first
    f.write_bytes(b"two")
    os.utime(f, ns=(1, 1))  # even with an old mtime the size/mtime key changed, so the digest is recomputed
    assert file_digest(f) != first


def test_a_checkpoint_of_a_run_with_other_inputs_is_not_resumed(tmp_path):
    """ESPnet would resume it with its saved optimiser state (the old learning rate)."""
    train = tmp_path / "train"
    train.mkdir()
    old = {"config": {"optim_conf": {"lr": 0.001}}}
    (train / MADE_FROM).write_text(json.dumps(old))
    torch.save({"optimizers": [{"param_groups": [{"lr": 0.001}]}]}, train / "checkpoint.pth")
    torch.save({}, train / "3epoch.pth")

    discard_checkpoint_of_other_inputs(train, old)  # same inputs: resumed
    assert (train / "checkpoint.pth").is_file() and (train / "3epoch.pth").is_file()

    new = {"config": {"optim_conf": {"lr": 0.005}}}
    discard_checkpoint_of_other_inputs(train, new)
    assert list(train.glob("*.pth")) == []
    assert json.loads((train / MADE_FROM).read_text()) == new  # the run that starts now is recorded


def test_hypotheses_are_copied_only_under_a_record_that_vouches_for_them(tmp_path, monkeypatch):
    """A tagged variant copies the default's hypotheses made from the same inputs; a donor whose record differs,
    or whose decode was killed between the hypotheses and their record, is not copied."""
    import pqm_ext.asr.decode as decode
    from pqm_ext.asr.layout import System

    system, wanted = System("fp", tmp_path / "base"), {"model": "ab12", "decode_conf": {"beam_size": 4}}
    donor, out = tmp_path / "exp/decode", decode.hyp_file(tmp_path / "exp/T/decode/fp", "spk1")
    decode.write_hypotheses(decode.hyp_file(donor / "fp", "spk1"), "spk1-1 ça va\n",
                            {"decode_s": 3.0, "made_from": wanted})
    other = {**wanted, "decode_conf": {"beam_size": 1}}
    assert decode.copy_decoded(system, "spk1", other, [donor], out) is None and not out.exists()
    assert decode.copy_decoded(system, "spk1", wanted, [donor], out) == decode.hyp_file(donor / "fp", "spk1")
    assert out.read_text(encoding="utf-8") == "spk1-1 ça va\n"
    assert json.loads(out.with_suffix(".json").read_text()) == {"decode_s": 3.0, "made_from": wanted}

    # the donor decoded again with other inputs and killed after its hypotheses: no record is left to vouch
    # for the new text, so nobody copies or reuses it as the old inputs' hypotheses
    real_write = decode.write_text_atomic

    def killed_after_the_text(path, text):
        real_write(path, text)
        if path.suffix == ".txt":
            raise KeyboardInterrupt

    monkeypatch.setattr(decode, "write_text_atomic", killed_after_the_text)
    try:
        decode.write_hypotheses(decode.hyp_file(donor / "fp", "spk1"), "spk1-1 new\n", {"made_from": other})
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert not decode.hyp_file(donor / "fp", "spk1").with_suffix(".json").exists()
    out.with_suffix(".json").unlink()
    assert decode.copy_decoded(system, "spk1", wanted, [donor], out) is None
    assert decode.copy_decoded(system, "spk1", other, [donor], out) is None


def test_a_table_refuses_hypotheses_of_another_test_set_or_model(tmp_path):
    """make_results scores a system only with a hypothesis for every test utterance, made from the test
    utterances, model and adapter on disk now (a missing one was scored as all deletions, a stale one as current)."""
    import pytest

    import pqm_ext.asr.decode as decode
    from pqm_ext.asr.layout import System
    from pqm_ext.asr.results import check_decoded_from
    from pqm_ext.data.kaldi_dir import DataDir
    from pqm_ext.utils.errors import InputError

    (tmp_path / "base").mkdir()
    (tmp_path / "base/model.safetensors").write_bytes(b"weights")
    system, decode_dir = System("fp", tmp_path / "base"), tmp_path / "decode/fp"
    data = DataDir({"a-1": "a1.wav", "a-2": "a2.wav"}, {"a-1": "HELLO", "a-2": "WORLD"}, {"a-1": "a", "a-2": "a"})
    conf = {"beam_size": 1}
    decode.write_hypotheses(decode.hyp_file(decode_dir, "a"), "a-1 hello\na-2 world\n",
                            {"made_from": decode.decode_inputs(system, "a", data, ["a-1", "a-2"], conf)})
    hyps = {"a-1": "hello", "a-2": "world"}
    check_decoded_from(system, decode_dir, data, hyps)  # current: no error
    with pytest.raises(InputError, match=rf"{decode_dir}/hyp/a.txt: no hypothesis for a-2 \(1 test utterance"):
        check_decoded_from(system, decode_dir, data, {"a-1": "hello"})
    grown = DataDir({**data.wav_scp, "a-3": "a3.wav"}, {**data.text, "a-3": "AGAIN"}, {**data.utt2spk, "a-3": "a"})
    with pytest.raises(InputError, match=rf"{decode_dir}/hyp/a.json: decoded before its test utterances changed"):
        check_decoded_from(system, decode_dir, grown, {**hyps, "a-3": "again"})
    (tmp_path / "base/model.safetensors").write_bytes(b"quantised again")
    with pytest.raises(InputError, match=rf"{decode_dir}/hyp/a.json: decoded before its model changed"):
        check_decoded_from(system, decode_dir, data, hyps)
    # a speaker whose record is gone while others have theirs: a decoding stopped while it replaced them
    two = DataDir({**data.wav_scp, "b-1": "b1.wav"}, {**data.text, "b-1": "AGAIN"}, {**data.utt2spk, "b-1": "b"})
    decode.write_hypotheses(decode.hyp_file(decode_dir, "b"), "b-1 again\n",
                            {"made_from": decode.decode_inputs(system, "b", two, ["b-1"], conf)})
    decode.hyp_file(decode_dir, "a").with_suffix(".json").unlink()
    with pytest.raises(InputError, match=rf"{decode_dir}/hyp/a.json: missing beside the other speakers' records"):
        check_decoded_from(system, decode_dir, two, {**hyps, "b-1": "again"})

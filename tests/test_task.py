"""PQMASRTask's additions to ESPnet's ASR task: Whisper targets, config handling."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import yaml

from pqm_ext.asr.config import merge_configs
from pqm_ext.tasks.pqm_asr import PQMASRTask, whisper_text


def test_whisper_text_is_written_as_whisper_writes():
    assert whisper_text("DON'T YOU FEEL MORE") == " Don't you feel more"


def test_whisper_targets_start_with_one_notimestamps_token(whisper_base_dir):
    from whisper.tokenizer import get_tokenizer

    tok = get_tokenizer(multilingual=False)
    args = argparse.Namespace(**yaml.safe_load((whisper_base_dir / "config.yaml").read_text()))
    fn = PQMASRTask.build_preprocess_fn(args, train=True)
    out = fn("utt", {"speech": np.zeros(1600, dtype=np.float32), "text": "PLEASE CALL STELLA"})
    # ESPnet's Whisper converter prefixes <|notimestamps|>; the decoder's sos is <|startoftranscript|>,
    # so training sees exactly the prompt ESPnet decodes with.
    assert list(out["text"]) == [tok.no_timestamps] + tok.encode(" Please call stella")


def test_merge_configs_merges_conf_mappings_one_level(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("optim: adam\noptim_conf: {lr: 0.1, eps: 1.0e-8}\nmax_epoch: 3\n")
    b.write_text("optim_conf: {lr: 0.01}\nmax_epoch: 1\n")
    assert merge_configs([a, b]) == {"optim": "adam", "optim_conf": {"lr": 0.01, "eps": 1e-8}, "max_epoch": 1}


def test_espnet_parser_rejects_unknown_keys(tmp_path):
    from pqm_ext.asr.config import parse_task_args
    from pqm_ext.utils.errors import InputError

    with pytest.raises(InputError, match="rejected by ESPnet's parser"):
        parse_task_args(PQMASRTask, {"max_epochs": 3}, tmp_path / "conf.yaml")

"""Bad input to the stages: each case gives a clear error naming the file (and line), and leaves no
partial output. Data-preparation cases live in test_data_*.py, checkpoint/adapter cases in
test_quant_checkpoint.py and test_lora.py; these are the recipe- and stage-level ones.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pqm_ext.asr.adapt import adapt_speaker
from pqm_ext.asr.config import merge_configs, read_yaml
from pqm_ext.asr.layout import ExpLayout
from pqm_ext.bin.quantize import quantize_dir
from pqm_ext.data.kaldi_dir import DataDir, Segment, read_data_dir
from pqm_ext.lora import AdapterConfig
from pqm_ext.models.whisper import read_whisper_checkpoint
from pqm_ext.quant import QuantConfig
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import atomic_dir, unit_of_work, write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def pqm_sh(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The shared stage script in a bare recipe directory (only the checks before any stage run)."""
    recipe = tmp_path / "recipe"
    recipe.mkdir(exist_ok=True)
    for name, target in [("pqm.sh", "egs/TEMPLATE/pqm.sh"), ("path.sh", "egs/TEMPLATE/path.sh"),
                         ("cmd.sh", "egs/TEMPLATE/cmd.sh"), ("conf", "egs/TEMPLATE/conf"), ("utils", "utils")]:
        if not (recipe / name).exists():
            (recipe / name).symlink_to(REPO / target)
    return subprocess.run(["./pqm.sh", *args], cwd=recipe, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--stage", "6", "--stop_stage", "2"], "--stage 6 is after --stop_stage 2"),
    (["--model", "lstm"], "--model must be whisper or conformer, not 'lstm'"),
    (["--no_such_option", "1"], "unknown option --no_such_option"),
    (["--stage", "8", "stray"], "unexpected argument: stray"),
    (["--jobs_per_gpu", "0"], "--jobs_per_gpu must be a positive integer, not '0'"),  # not hours later, at stage 7
    (["--pretrained_model", "m"], "--pretrained_model is a Conformer's (--model conformer)"),  # not silently ignored
    (["--model", "conformer", "--whisper_checkpoint", "base.en.pt"], "--whisper_checkpoint is Whisper's"),
    (["--tag", "../x"], "--tag '../x': a directory name beside base/ and nf4/"),
    (["--tag", "nf4"], "--tag 'nf4': a directory name"),           # would be the quantised model's directory
    (["--tag", "decode"], "--tag 'decode': a directory name"),
    (["--tag", "RESULTS.md"], "--tag 'RESULTS.md': a directory name"),  # the default table's files
    (["--noise_scp", ""], "--noise_scp is empty: give a list"),   # else the next option would be read as the list
    (["--stage", "5x"], "--stage must be a whole number, not '5x'"),  # was a no-op that exited 0
    (["--nj", "0"], "--nj must be a positive integer, not '0'"),
    (["--tag", "JOB-es"], "--tag 'JOB-es': the word JOB in it would become each job's number"),
])
def test_stage_script_rejects_bad_options_before_running(tmp_path, args, message):
    res = pqm_sh(tmp_path, *args)
    assert res.returncode != 0 and message in res.stderr
    assert not (tmp_path / "recipe/exp").exists() and not (tmp_path / "recipe/data").exists()


@pytest.mark.parametrize("step, args", [
    ("adapt_speakers", ["--splits", "s", "--speakers", "a", "--nutts", "5"]),
    ("decode", ["--speakers", "a", "--decode_config", "d.yaml"]),
    ("make_results", ["--model", "whisper", "--corpus", "c", "--decode_config", "d.yaml"]),
])
def test_entry_points_refuse_the_tags_pqm_sh_refuses(tmp_path, step, args):
    """Run on their own, the stage-7/8 entry points apply the same rule (pqm_ext.asr.layout.tag_problem)."""
    res = subprocess.run([sys.executable, "-m", f"pqm_ext.bin.{step}", "--exp_dir", str(tmp_path / "exp"),
                          "--tag", "int4", "--data", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "error: --tag 'int4': a directory name beside base/ and nf4/" in res.stderr, res.stderr


def test_a_tag_named_after_the_recipes_own_quantisation_config_is_refused(tmp_path):
    """pqm.sh passes the labels of the recipe's conf/quant_*.yaml: a recipe's own int8 is reserved too."""
    conf = tmp_path / "recipe/conf"
    conf.mkdir(parents=True)
    for entry in (REPO / "egs/TEMPLATE/conf").iterdir():
        (conf / entry.name).symlink_to(entry)
    (conf / "quant_int8.yaml").write_text("quant_conf: {method: int4}\n")
    res = pqm_sh(tmp_path, "--tag", "int8")
    assert res.returncode != 0 and "--tag 'int8': a directory name" in res.stderr
    assert not (tmp_path / "recipe/data").exists()


def test_option_strings_keep_their_quoted_words_together(tmp_path):
    """--data_opts "--target_speakers '1089 1188'" reaches local/data.sh as two words (was three, and refused);
    unbalanced quotes are an error, not a guess."""
    local = tmp_path / "recipe/local"
    local.mkdir(parents=True)
    (local / "data.sh").write_text('#!/usr/bin/env bash\nprintf "[%s]\\n" "$@" > "$(dirname "$0")/args"\n')
    (local / "data.sh").chmod(0o755)
    res = pqm_sh(tmp_path, "--stop_stage", "1", "--corpus_dir", str(tmp_path),
                 "--data_opts", "--target_speakers '1089 1188' --sa_subsets \"train test\"")
    assert res.returncode == 0, res.stderr
    assert (local / "args").read_text().splitlines()[-4:] == [
        "[--target_speakers]", "[1089 1188]", "[--sa_subsets]", "[train test]"]
    res = pqm_sh(tmp_path, "--stop_stage", "1", "--corpus_dir", str(tmp_path), "--data_opts", "--x 'unclosed")
    assert res.returncode != 0 and "--data_opts '--x 'unclosed': cannot split it into words (unbalanced quotes?)" in res.stderr


def test_decoding_refuses_audio_at_another_rate_and_an_unformatted_data_dir(tmp_path):
    """An 8 kHz file was decoded as if it were 16 kHz; a dir with segments failed with a bare KeyError."""
    import numpy as np
    import soundfile as sf
    from pqm_ext.asr.decode import read_speech

    wav = tmp_path / "a-1.wav"
    sf.write(wav, 0.1 * np.sin(np.arange(8000) / 8000 * 2 * np.pi * 440), 8000)
    with pytest.raises(InputError, match=f"{wav}: sampled at 8000 Hz; the models take 16000 Hz"):
        read_speech(wav)
    data = tmp_path / "data"
    data.mkdir()
    DataDir({"rec": str(wav)}, {"a-1": "HELLO"}, {"a-1": "a"}, segments={"a-1": Segment("rec", 0.0, 0.5)}).write(data)
    res = subprocess.run([sys.executable, "-m", "pqm_ext.bin.decode", "--exp_dir", str(tmp_path / "exp"),
                          "--data", str(data), "--speakers", "a", "--decode_config",
                          str(REPO / "egs/TEMPLATE/conf/whisper/decode.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and f"{data}/segments: decoding reads one file per utterance" in res.stderr, res.stderr


def test_nj_larger_than_the_number_of_speakers(tmp_path):
    sa_test = tmp_path / "recipe/data/sa_test"
    sa_test.mkdir(parents=True)
    (sa_test / "spk2utt").write_text("a a-1 a-2\nb b-1\n")
    res = pqm_sh(tmp_path, "--stage", "8", "--stop_stage", "8", "--nj", "3")
    assert res.returncode != 0 and "--nj 3 is larger than the number of target speakers (2)" in res.stderr
    assert not (tmp_path / "recipe/exp/whisper/decode/log").exists()


def test_nj_larger_than_the_number_of_speakers_is_refused_before_stage_7(tmp_path):
    sa_test = tmp_path / "recipe/data/sa_test"
    sa_test.mkdir(parents=True)
    (sa_test / "spk2utt").write_text("a a-1 a-2\nb b-1\n")
    res = pqm_sh(tmp_path, "--stage", "7", "--nj", "3")
    assert res.returncode != 0 and "--nj 3 is larger than the number of target speakers (2)" in res.stderr
    assert "Stage 7:" not in res.stderr and not (tmp_path / "recipe/exp/whisper/adapt").exists()


def test_a_decoding_option_typo_is_refused_before_any_stage_naming_file_and_line(tmp_path):
    conf = tmp_path / "decode.yaml"
    conf.write_text("beam_size: 2\nbeam_sise: 3\nctc_weight: 0.0\n")
    res = pqm_sh(tmp_path, "--stage", "8", "--decode_config", str(conf))
    assert res.returncode != 0, res.stderr
    assert f"{conf}:2: 'beam_sise' is not an option of ESPnet's Speech2Text" in res.stderr
    assert "Stage 8" not in res.stderr
    from pqm_ext.asr.recognizer import read_decode_config  # the decoding entry point's own check
    with pytest.raises(InputError, match=f"{conf}:2: 'beam_sise'"):
        read_decode_config(conf)
    conf.write_text("beam_size: 2\nmax_tokens_per_second: 8\n")
    assert read_decode_config(conf) == {"beam_size": 2, "max_tokens_per_second": 8}


@pytest.mark.parametrize("args, datadir", [
    ([], "data"),                                                  # Whisper: the 1 h demo pool
    (["--model", "conformer"], "data_3h"),                         # a demo Conformer trained on its own 3 h pool
    (["--model", "conformer", "--pretrained_model", "m"], "data"),  # an imported one only pretrains LoRA on it
    (["--model", "conformer", "--datadir", "mine"], "mine"),
])
def test_which_data_dirs_a_demo_run_reads(tmp_path, args, datadir):
    sa_test = tmp_path / "recipe" / datadir / "sa_test"
    sa_test.mkdir(parents=True)
    (sa_test / "spk2utt").write_text("a a-1 a-2\nb b-1\n")
    res = pqm_sh(tmp_path, *args, "--stage", "8", "--stop_stage", "8", "--nj", "3")
    assert res.returncode != 0 and "--nj 3 is larger than the number of target speakers (2)" in res.stderr


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "quant.yaml"
    bad.write_text("quant_conf:\n  method: nf4\n  blocksize: [64\n")
    with pytest.raises(InputError, match=rf"{bad}:\d+: invalid YAML"):
        read_yaml(bad)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path}/nope.yaml: config file not found"):
        merge_configs([tmp_path / "nope.yaml"])


@pytest.mark.parametrize("conf, message", [
    ({"quant_conf": {"method": "nf5"}}, "quantisation method 'nf5' is not one of"),
    ({"quant_conf": {"method": "nf4", "block": 64}}, r"unknown quantisation option\(s\) \['block'\]"),
    ({"quant": {"method": "nf4"}}, r"unknown key\(s\) \['quant'\]"),
])
def test_bad_quantisation_config(tmp_path, conf, message):
    cfg = tmp_path / "quant.yaml"
    cfg.write_text(yaml.safe_dump(conf))
    with pytest.raises(InputError, match=f"^{cfg}: .*{message}"):  # the file is named, no traceback needed
        quantize_dir(tmp_path / "base", cfg, tmp_path / "nf4")
    assert not (tmp_path / "nf4").exists()


def test_stage_4_refuses_a_whisper_base_as_a_conformer(tmp_path):
    """Whisper's stage 4 also writes config.yaml + a full-precision model.safetensors: importable in form, but
    no Conformer (peft would find none of its LoRA targets only at stage 6)."""
    whisper = tmp_path / "exp/whisper/base"
    whisper.mkdir(parents=True)
    (whisper / "config.yaml").write_text(yaml.safe_dump({"encoder": "pqm_whisper", "decoder": "pqm_whisper"}))
    (whisper / "model.safetensors").write_bytes(b"")
    res = subprocess.run([sys.executable, "-m", "pqm_ext.bin.train_base", "--config", "c.yaml", "--token_list", "t",
                          "--train_data", "d", "--valid_data", "v", "--out", "exp/conformer/base",
                          "--pretrained_model", str(whisper)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert f"{whisper}/config.yaml: a Whisper model: it is --model whisper's base, not a Conformer's" in res.stderr
    assert not (tmp_path / "exp/conformer").exists()


def test_missing_base_model(tmp_path):
    cfg = tmp_path / "quant.yaml"
    cfg.write_text(yaml.safe_dump({"quant_conf": {"method": "nf4"}}))
    with pytest.raises(InputError, match=f"{tmp_path}/base/model.safetensors: not found"):
        quantize_dir(tmp_path / "base", cfg, tmp_path / "nf4")
    assert not (tmp_path / "nf4").exists()


@pytest.mark.parametrize("content, message", [
    (None, "Whisper checkpoint not found"),
    (b"\x00" * 100, "cannot read as an openai-whisper checkpoint"),
])
def test_bad_whisper_checkpoint(tmp_path, content, message):
    path = tmp_path / "base.en.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=f"{path}: {message}"):
        read_whisper_checkpoint(path)


def test_lora_config_errors():
    with pytest.raises(ValueError, match=r"unknown LoRA option\(s\) \['rnak'\]"):
        AdapterConfig.from_dict({"rnak": 4, "target_modules": ["x"]})
    with pytest.raises(ValueError, match="LoRA rank must be >= 1"):
        AdapterConfig.from_dict({"rank": 0, "target_modules": ["x"]})
    with pytest.raises(ValueError, match="blocksize 48"):
        QuantConfig(blocksize=48)


def _sa_data(tmp_path: Path) -> DataDir:
    utts = [f"spk1-{i}" for i in range(3)]
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits/spk1.adapt").write_text("\n".join(utts) + "\n")
    return DataDir(wav_scp={u: f"/nowhere/{u}.wav" for u in utts}, text={u: "HELLO" for u in utts},
                   utt2spk={u: "spk1" for u in utts})


def test_more_adaptation_utterances_requested_than_the_speaker_has(tmp_path):
    layout = ExpLayout(tmp_path / "exp")
    failures = adapt_speaker(layout, "spk1", _sa_data(tmp_path), tmp_path / "splits", [5], ["scratch"],
                             {"scratch": []})
    assert failures == [f"spk1 n=5: {tmp_path}/splits/spk1.adapt has only 3 adaptation utterances"]
    assert not (tmp_path / "exp").exists()


def test_speaker_without_a_split_file(tmp_path):
    _sa_data(tmp_path)
    with pytest.raises(InputError, match=f"{tmp_path}/splits/spk9.adapt: speaker split file not found"):
        adapt_speaker(ExpLayout(tmp_path / "exp"), "spk9", DataDir({}, {}, {}), tmp_path / "splits", [2],
                      ["scratch"], {"scratch": []})


def test_missing_pseudo_labels_for_semi_supervised_adaptation(tmp_path):
    labels = tmp_path / "pseudo.txt"
    labels.write_text("spk1-0 HELLO\n")
    failures = adapt_speaker(ExpLayout(tmp_path / "exp"), "spk1", _sa_data(tmp_path), tmp_path / "splits", [2],
                             ["semi"], {"semi": []}, pseudo_text=labels)
    assert len(failures) == 1 and f"{labels}: no pseudo-label for spk1-1" in failures[0]
    assert not list((tmp_path / "exp").rglob("adapter"))


def test_a_resumed_unit_rewrites_the_split_an_earlier_run_left(tmp_path):
    # An interrupted run with valid_fraction 0.5 left a training dir of one utterance; the re-run keeps
    # all three (valid_fraction 0), even though its training then fails (there is no quantised base).
    layout = ExpLayout(tmp_path / "exp")
    data = _sa_data(tmp_path)
    stale = layout.adapt("scratch", 3, "spk1") / "data"
    stale.mkdir(parents=True)
    part = data.subset(["spk1-0"])
    part.utt2num_samples = {"spk1-0": 16000}  # a complete formatted dir
    part.write(stale)
    failures = adapt_speaker(layout, "spk1", data, tmp_path / "splits", [3], ["scratch"], {"scratch": []})
    assert len(failures) == 1 and "spk1 n=3 init=scratch" in failures[0]
    assert sorted(read_data_dir(stale).text) == ["spk1-0", "spk1-1", "spk1-2"]
    assert sorted(read_data_dir(stale.parent / "data_valid").text) == ["spk1-0", "spk1-1"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere; covered by the not-a-directory case")
def test_unwritable_output_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(InputError, match="cannot write here"):
        write_text_atomic(ro / "x.txt", "x")


def test_output_path_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=f"{tmp_path}/file/out: cannot write here"):
        with atomic_dir(tmp_path / "file" / "out"):
            pass


def test_interrupted_atomic_dir_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("written")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_empty_pseudo_labels_are_left_out_and_all_empty_is_an_error(tmp_path, caplog):
    """A teacher that decoded an utterance to nothing gives nothing to learn: that utterance is left out (and
    said so); if every one is empty, the unit fails naming the file."""
    from pqm_ext.asr.adapt import with_pseudo_labels

    labels = tmp_path / "pseudo.txt"
    with caplog.at_level("WARNING"):
        assert with_pseudo_labels(["u0", "u1", "u2"], {"u0": "HELLO", "u1": "", "u2": "WORLD"}, labels) == ["u0", "u2"]
    assert f"{labels}: 1 of 3 adaptation utterances have an empty pseudo-label and are left out (u1)" in caplog.text
    with pytest.raises(InputError, match=f"{labels}: every pseudo-label of u0..u1 is empty"):
        with_pseudo_labels(["u0", "u1"], {"u0": " ", "u1": ""}, labels)


def test_a_whisper_model_config_espnet_rejects_is_named_before_any_conversion(whisper_token_list, tmp_path):
    """The error named a deleted temporary file, after a minute of checkpoint conversion."""
    from pqm_ext.bin.prepare_whisper_base import prepare_whisper_base

    conf = tmp_path / "model.yaml"
    conf.write_text((REPO / "egs/TEMPLATE/conf/whisper/model.yaml").read_text() + "bogus_key: 1\n")
    with pytest.raises(InputError, match=f"^{conf}: the configuration was rejected by ESPnet's parser"):
        prepare_whisper_base(str(conf), str(whisper_token_list), str(tmp_path / "base"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.yaml"]


def test_pseudo_labels_are_trained_in_the_references_normal_form(tmp_path):
    """Whisper's cased, punctuated hypotheses become the corpus's form, the form the initial LoRA learnt;
    one with nothing left (punctuation only), or with digits the form cannot spell, is an empty pseudo-label,
    which adaptation leaves out."""
    from pqm_ext.asr.adapt import read_labels

    labels = tmp_path / "pseudo.txt"
    labels.write_text("u0  Hello, world\u2014it\u2019s me.\nu1 ...\nu2\nu3 I have 3 cats.\n"
                      "u4 (Laughter) So that was it. [Music] \u266a\nu5 In the year (1998).\n", encoding="utf-8")
    assert read_labels(labels) == {"u0": "HELLO WORLD IT'S ME", "u1": "", "u2": "", "u3": "",  # not "I HAVE CATS"
                                   "u4": "SO THAT WAS IT", "u5": ""}  # annotations go; digits in brackets count


def test_a_bad_lora_conf_names_the_yaml_that_sets_it(tmp_path):
    """Stage 6/7 merge several YAML files; a wrong LoRA option is reported against the one that holds lora_conf."""
    from pqm_ext.asr.train import training_plan

    (tmp_path / "nf4").mkdir()
    (tmp_path / "nf4/config.yaml").write_text("encoder: conformer\n")
    stage = tmp_path / "adapt_scratch.yaml"
    stage.write_text(yaml.safe_dump({"lora_conf": {"rank": 0, "target_modules": ["linear_q"]}}))
    trainer = tmp_path / "lora_trainer.yaml"
    trainer.write_text("optim: adam\n")
    with pytest.raises(InputError, match=f"^{stage}: lora_conf: LoRA rank must be >= 1, got 0"):
        training_plan(tmp_path / "nf4", [stage, trainer], tmp_path / "data", tmp_path / "data", tmp_path / "out")


def test_a_table_refuses_a_decoding_record_it_cannot_read_or_that_names_other_settings(tmp_path):
    from pqm_ext.asr.results import check_decoded_with, decode_timing
    hyp = tmp_path / "decode" / "pqm_n20" / "hyp"
    hyp.mkdir(parents=True)
    conf = {"beam_size": 4, "ctc_weight": 0.3}
    (hyp / "a.json").write_text('{"decode_conf": {"beam_size": 4, "ctc_weight": 0.3}, "audio_s": 2.0, "decode_s": 1.0}')
    (hyp / "b.json").write_text('{"decode_conf": {"beam_size": 4, "ctc_weight": 0.3}, "audio_s": 2.0, "decode_s": 0.')
    with pytest.raises(InputError, match=r"hyp/b\.json: not a readable decoding record .* run stage 8 again"):
        check_decoded_with(hyp.parent, ["a", "b"], conf)
    with pytest.raises(InputError, match=r"hyp/b\.json: not a readable decoding record"):
        decode_timing(hyp.parent, ["a", "b"])
    (hyp / "b.json").write_text('{"decode_conf": {"beam_size": 8, "ctc_weight": 0.3}, "audio_s": 2.0, "decode_s": 3.0}')
    with pytest.raises(InputError, match=r"hyp/b\.json: decoded with other settings .*beam_size: 8 -> 4"):
        check_decoded_with(hyp.parent, ["a", "b"], conf)
    check_decoded_with(hyp.parent, ["a", "c"], conf)  # no record: nothing to refuse
    assert decode_timing(hyp.parent, ["a", "b"]) == {"audio_s": 4.0, "decode_s": 4.0, "rtf": 1.0}


@contextlib.contextmanager
def _child(code: str, *args: str):
    """A real process running ``code``; yields it and the one line it prints when it is where the test wants
    it, and SIGKILLs it on the way out."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        yield proc, proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def test_a_unit_killed_inside_an_atomic_write_is_swept_when_it_starts_again(tmp_path):
    """SIGKILL gives atomic_dir no chance to clean up: its half-written temporary stays (never under the real
    name) until the unit starts again; the unit's finished files stay."""
    unit = tmp_path / "unit"
    (unit / "data").mkdir(parents=True)
    (unit / "data" / "text").write_text("u1 HELLO\n")
    (unit / "train").mkdir()
    (unit / "train" / ".made_from.json.tmp-x").write_text("{")
    with _child("import sys, time; from pqm_ext.utils.fileio import atomic_dir\n"
                "with atomic_dir(sys.argv[1] + '/adapter') as tmp:\n"
                "    (tmp / 'adapter_model.safetensors').write_bytes(b'half')\n"
                "    print('writing', flush=True); time.sleep(60)\n", str(unit)) as (_, said):
        assert said == "writing"
    assert [p.name for p in unit.iterdir() if p.name.startswith(".adapter.tmp-")] and not (unit / "adapter").exists()
    with unit_of_work(unit, "train"):
        assert sorted(p.name for p in unit.iterdir()) == [".lock", "data", "train"]
        assert list((unit / "train").iterdir()) == []
    assert (unit / "data" / "text").read_text() == "u1 HELLO\n"


def test_a_unit_in_use_by_a_live_process_is_refused_and_free_once_it_dies(tmp_path):
    """A job left running by a launcher killed with SIGKILL, or a second run of the recipe, must not train the
    same unit at the same time (nor have its temporaries swept): it is refused, naming the unit and the pid."""
    unit = tmp_path / "adapt" / "scratch" / "n5" / "spk1"
    with _child("import sys, time; from pqm_ext.utils.fileio import unit_of_work\n"
                "with unit_of_work(sys.argv[1]) as d:\n"
                "    (d / '.adapter.tmp-live').mkdir()\n"
                "    print('working', flush=True); time.sleep(60)\n", str(unit)) as (proc, said):
        assert said == "working"
        holder = rf"host {re.escape(socket.gethostname())}, pid {proc.pid}(, Slurm job \d+)?"  # in an allocation too
        with pytest.raises(InputError, match=f"{unit}: in use by another process \\({holder}\\)"):
            with unit_of_work(unit):
                pass
        assert (unit / ".adapter.tmp-live").is_dir()  # the live writer's temporary was not touched
    with unit_of_work(unit):  # the kernel dropped the dead holder's lock
        assert not (unit / ".adapter.tmp-live").exists()

"""The TED-LIUM 3 recipe with the Conformer AED, end to end on a tiny synthesised corpus.

Covers what the Whisper run in test_recipe.py does not: the TED-LIUM layout (sph + stm, segments,
talks as speakers), stage 3's sentencepiece token list, stage 4's ESPnet training of a Conformer base
from scratch (its saved config is then the base of stages 5-7), BatchNorm in the adapted model, and
joint CTC/attention beam search in stage 8.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_DEMO = ("--num_target_speakers 3 --num_pool_speakers 2 --adapt_per_speaker 4 --test_per_speaker 3 "
             "--pool_per_speaker 6 --dev_speakers 1 --dev_per_speaker 2")
ARGS = ["--corpus", "tedlium3_sa", "--corpus_layout", "tedlium3", "--model", "conformer", "--demo_opts", TINY_DEMO,
        "--data_opts", "--num_target_speakers 2 --max_adapt 4 --num_test 3", "--nutts", "2 4", "--nbpe", "30",
        "--asr_args", "--max_epoch 1 --batch_bins 400000", "--lora_args", "--max_epoch 3 --batch_size 2",
        "--pretrain_args", "--max_epoch 2", "--adapt_args", "--max_epoch 1", "--nj", "2",
        "--audio_format", "flac",  # ESPnet's default dump format: trained, adapted and decoded from FLAC
        "--noise_scp", "demo", "--rir_scp", "demo"]  # multi-condition LoRA pretraining on the demo's noise and RIRs


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe") / "tedlium3_sa"
    root.mkdir()
    for name, target in [("pqm.sh", "egs/TEMPLATE/pqm.sh"), ("path.sh", "egs/TEMPLATE/path.sh"),
                         ("cmd.sh", "egs/TEMPLATE/cmd.sh"), ("conf", "egs/TEMPLATE/conf"), ("utils", "utils"),
                         ("local", "egs/tedlium3_sa/local")]:
        (root / name).symlink_to(REPO / target)
    (root / "db.sh").write_text("TEDLIUM3=\n")
    res = subprocess.run(["./pqm.sh", *ARGS], cwd=root, capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-5000:]
    return root


def test_the_demo_corpus_has_the_tedlium_layout_and_talks_are_speakers(recipe):
    legacy = recipe / "downloads/demo/TEDLIUM_release-3/legacy"
    assert sorted(p.name for p in legacy.iterdir()) == ["dev", "test", "train"]
    assert list((legacy / "train/sph").glob("*.sph")) and list((legacy / "train/stm").glob("*.stm"))
    seg = (recipe / "data/sa_test/segments").read_text().splitlines()
    talks = {line.split()[1] for line in seg}
    assert len(talks) == 2
    utt2spk = dict(line.split() for line in (recipe / "data/sa_test/utt2spk").read_text().splitlines())
    assert {utt2spk[line.split()[0]] for line in seg} == talks  # speaker = talk
    dumped = [line.split()[1] for x in ("pretrain", "sa_test") for line in
              (recipe / f"dump/raw/{x}/wav.scp").read_text().splitlines()]
    assert dumped and all(p.endswith(".flac") for p in dumped)


def test_stage_3_and_4_build_a_bpe_conformer_with_espnet(recipe):
    base = recipe / "exp/conformer/base"
    conf = yaml.safe_load((base / "config.yaml").read_text())
    assert conf["encoder"] == "conformer" and conf["decoder"] == "transformer"
    assert conf["token_type"] == "bpe" and conf["model_conf"]["ctc_weight"] == 0.3
    assert len(conf["token_list"]) == 30
    assert conf["encoder_conf"]["use_cnn_module"]  # the convolution module, with its BatchNorm
    assert (recipe / "data/token_list/bpe_unigram30/tokens.txt").is_file()
    log = (recipe / "exp/conformer/base_train/train.log").read_text()
    assert "1epoch results" in log  # ESPnet's trainer ran an epoch
    # the base carries its own sentencepiece model, so it decodes the same from any recipe
    assert conf["bpemodel"] == "exp/conformer/base/bpe.model"
    assert (base / "bpe.model").read_bytes() == (recipe / "data/token_list/bpe_unigram30/bpe.model").read_bytes()


def test_an_imported_espnet_model_keeps_its_own_bpe_model(recipe, tmp_path, monkeypatch):
    """--pretrained_model from another recipe: its config's relative bpemodel path also exists in the
    importing recipe, but holds that corpus' BPE model; the import must take the model's own."""
    from pqm_ext.bin.make_bpe import make_bpe
    from pqm_ext.bin.train_base import export
    from pqm_ext.utils.errors import InputError

    pack = tmp_path / "other_recipe"
    (pack / "exp").mkdir(parents=True)
    shutil.copytree(recipe / "exp/conformer/base_train", pack / "exp/asr_train",
                    ignore=shutil.ignore_patterns("*epoch.pth", "checkpoint.pth", "*.log"))
    own = pack / "data/token_list/bpe_unigram30/bpe.model"
    own.parent.mkdir(parents=True)
    shutil.copy(recipe / "data/token_list/bpe_unigram30/bpe.model", own)
    here = tmp_path / "this_recipe"  # same relative path, a BPE model trained on other text
    reversed_text = here / "text"
    reversed_text.parent.mkdir()
    reversed_text.write_text("".join(f"u{i} {' '.join(w[::-1] for w in line.split()[1:])}\n" for i, line in
                                     enumerate((recipe / "data/pretrain/text").read_text().splitlines())))
    make_bpe(reversed_text, 30, here / "data/token_list/bpe_unigram30")
    monkeypatch.chdir(here)

    export(pack / "exp/asr_train", Path("exp/base"))
    conf = yaml.safe_load((here / "exp/base/config.yaml").read_text())
    assert conf["bpemodel"] == "exp/base/bpe.model"
    assert (here / "exp/base/bpe.model").read_bytes() == own.read_bytes()

    own.unlink()  # only the wrong one is left: refused, nothing written
    with pytest.raises(InputError, match=r"config.yaml: bpemodel .* does not match token_list"):
        export(pack / "exp/asr_train", Path("exp/base2"))
    assert not (here / "exp/base2").exists()


def test_a_base_exported_by_stage_4_imports_from_anywhere(recipe, tmp_path, monkeypatch):
    """--pretrained_model exp/conformer/base (config.yaml + model.safetensors, moved elsewhere): the same
    weights and its own sentencepiece model; a quantised model is refused, naming its file."""
    from safetensors.torch import load_file
    from pqm_ext.bin.train_base import export
    from pqm_ext.utils.errors import InputError

    moved = tmp_path / "models/my_base"  # its config names exp/conformer/base/bpe.model, which is not here
    shutil.copytree(recipe / "exp/conformer/base", moved)
    monkeypatch.chdir(tmp_path)
    export(moved, Path("exp/base"))
    original, imported = load_file(str(moved / "model.safetensors")), load_file("exp/base/model.safetensors")
    assert sorted(original) == sorted(imported) and all((original[k] == imported[k]).all() for k in original)
    assert (tmp_path / "exp/base/bpe.model").read_bytes() == (moved / "bpe.model").read_bytes()
    assert yaml.safe_load(Path("exp/base/config.yaml").read_text())["bpemodel"] == "exp/base/bpe.model"

    with pytest.raises(InputError, match=r"nf4/model.safetensors: not a full-precision base"):
        export(recipe / "exp/conformer/nf4", Path("exp/base_nf4"))
    assert not Path("exp/base_nf4").exists()


def test_stages_5_to_8_give_the_conformer_table_on_tedlium(recipe):
    res = json.loads((recipe / "exp/conformer/results.json").read_text())
    assert res["model"] == "conformer" and res["corpus"] == "tedlium3_sa"
    systems = res["systems"]
    for name in ("fp", "nf4", "int4", "lora_pretrained"):
        assert 0.0 <= systems[name]["wer"]
    for name in ("lora_scratch", "pqm"):
        assert sorted(systems[name], key=int) == ["2", "4"]
    assert res["bytes"]["fp32"] / res["bytes"]["nf4"] > 5
    adapters = sorted((recipe / "exp/conformer/adapt").glob("*/n*/*/adapter/adapter_model.safetensors"))
    assert len(adapters) == 2 * 2 * 2  # inits x N x speakers
    table = (recipe / "exp/conformer/RESULTS.md").read_text()
    assert "conformer on tedlium3_sa" in table and "| pqm | 4 |" in table
    dec = yaml.safe_load((REPO / "egs/TEMPLATE/conf/conformer/decode.yaml").read_text())
    assert dec["ctc_weight"] > 0 and dec["beam_size"] > 1  # stage 8 ran the joint CTC/attention beam search


def test_pretrain_and_adapt_args_each_reach_their_own_stage(recipe):
    """--lora_args says 3 epochs for stages 6 and 7; --pretrain_args (2) and --adapt_args (1), which come after it,
    each override it for their own stage only."""
    from pqm_ext.lora.io import read_adapter

    def max_epoch(adapter_dir: Path) -> int:
        return json.loads(read_adapter(adapter_dir)[1]["pqm_info"])["max_epoch"]

    exp = recipe / "exp/conformer"
    assert max_epoch(exp / "lora_pretrain/adapter") == 2
    speaker_adapters = sorted(exp.glob("adapt/*/n*/*/adapter"))
    assert speaker_adapters and {max_epoch(d) for d in speaker_adapters} == {1}


def test_stage_6_hands_the_noise_and_rir_lists_to_espnet_and_stage_7_none(recipe, monkeypatch):
    """--noise_scp/--rir_scp demo: stage 6 synthesises the set and ESPnet trains on it with
    conf/pretrain_augment.yaml's rates; the adapter's record names the lists; speaker adaptation gets none."""
    from pqm_ext.asr.augment import check_audio_list
    from pqm_ext.lora.io import adapter_info

    monkeypatch.chdir(recipe)  # the lists name their files as ESPnet reads them: from the recipe directory
    assert len(check_audio_list("downloads/noise_rir/noise.scp")) == 12
    assert len(check_audio_list("downloads/noise_rir/rir.scp")) == 12
    exp = recipe / "exp/conformer"
    conf = yaml.safe_load((exp / "lora_pretrain/train/config.yaml").read_text())
    assert conf["noise_scp"] == "downloads/noise_rir/noise.scp" and conf["rir_scp"] == "downloads/noise_rir/rir.scp"
    rates = yaml.safe_load((REPO / "egs/TEMPLATE/conf/pretrain_augment.yaml").read_text())
    assert {k: conf[k] for k in rates} == rates
    assert set(adapter_info(exp / "lora_pretrain/adapter")["made_from"]["augment"]) == {"noise_scp", "rir_scp"}
    speaker_adapters = sorted(exp.glob("adapt/*/n*/*/adapter"))
    assert speaker_adapters and all("augment" not in adapter_info(d)["made_from"] for d in speaker_adapters)


def test_speaker_adaptation_runs_without_the_bases_specaugment(recipe):
    """conf/conformer/adapt_*.yaml turn SpecAugment off for stage 7 only: the base and stage 6 keep it."""
    exp = recipe / "exp/conformer"
    assert yaml.safe_load((exp / "base/config.yaml").read_text())["specaug"] == "specaug"
    assert yaml.safe_load((exp / "lora_pretrain/train/config.yaml").read_text())["specaug"] == "specaug"
    configs = sorted(exp.glob("adapt/*/n*/*/train/config.yaml"))
    assert len(configs) == 2 * 2 * 2  # speakers x N x inits
    assert {yaml.safe_load(c.read_text())["specaug"] for c in configs} == {None}


def test_early_stopping_holds_out_the_last_utterances_and_keeps_the_best_epoch(recipe, tmp_path):
    """--valid_fraction: the adapter trains on the first utterances, is validated on the held-out rest, and the
    epoch that is best by the trainer's criterion is the one saved, not the last.

    The recipe's criterion is the held-out loss (conf/lora_trainer.yaml), but on this 1-epoch base which epoch
    has the lowest loss depends on the machine's floating point. So the test asks for a criterion whose best
    epoch is known in advance, the learning rate, with a schedule that switches it from tiny (epoch 1) to
    large: epoch 1 is the best, and its adapter differs from the last one's. The step scheduler also checks
    that the stage's scheduler does not inherit the base's warmuplr options. The adapter keeps the speaker's
    BatchNorm statistics (``--lora_conf batchnorm=speaker``), estimated on its training utterances for the
    best epoch's weights."""
    import torch
    from safetensors.torch import load_file
    from pqm_ext.asr.config import read_yaml
    from pqm_ext.lora.io import read_adapter

    assert read_yaml(REPO / "egs/TEMPLATE/conf/lora_trainer.yaml")["best_model_criterion"] == [["valid", "loss", "min"]]
    exp = tmp_path / "exp"
    exp.mkdir()
    for name in ("nf4", "lora_pretrain"):
        (exp / name).symlink_to(recipe / "exp/conformer" / name)
    by_lr = tmp_path / "best_by_lr.yaml"
    by_lr.write_text("best_model_criterion: [[train, optim0_lr0, min]]\nscheduler: multisteplr\n"
                     "scheduler_conf: {milestones: [1], gamma: 1.0e+9}\n")
    split = sorted((recipe / "data/sa_splits").glob("*.adapt"))[0]
    spk, order = split.stem, split.read_text().split()
    res = subprocess.run(
        [sys.executable, "-m", "pqm_ext.bin.adapt_speakers", "--exp_dir", str(exp), "--data", "dump/raw/sa_adapt",
         "--splits", "data/sa_splits", "--speakers", spk, "--nutts", "4", "--inits", "pretrained",
         "--config", f"pretrained=conf/lora_trainer.yaml,conf/conformer/adapt_pretrained.yaml,{by_lr}",
         "--train_args", "--max_epoch 3 --batch_size 1 --optim_conf lr=0.000000003 --lora_conf batchnorm=speaker",
         "--valid_fraction", "0.5",
         "--keep_checkpoints"],
        cwd=recipe, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = exp / "adapt/pretrained/n4" / spk
    utts = {part: {line.split()[0] for line in (out / part / "text").read_text().splitlines()}
            for part in ("data", "data_valid")}
    assert utts == {"data": set(order[:2]), "data_valid": set(order[2:4])}

    stats = torch.load(out / "train/checkpoint.pth", map_location="cpu", weights_only=False)["reporter"]["stats"]
    lr = {e: float(s["train"]["optim0_lr0"]) for e, s in stats.items()}
    assert sorted(lr) == [1, 2, 3] and lr[1] < 1e-8 and lr[2] > 1 and lr[3] > 1, lr
    assert all("loss" in s["valid"] for s in stats.values())  # the held-out utterances were validated every epoch
    tensors, meta = read_adapter(out / "adapter")
    info = json.loads(meta["pqm_info"])
    assert (info["epochs"], info["max_epoch"], info["trained_on"], info["held_out"]) == (1, 3, 2, 2)
    assert info["batchnorm_batches"] == 2  # the 2 training utterances, one per batch

    stats = {k: v for k, v in tensors.items() if k.startswith("pqm_batchnorm.")}
    tensors = {k: v for k, v in tensors.items() if k not in stats}
    blocks = yaml.safe_load((recipe / "exp/conformer/base/config.yaml").read_text())["encoder_conf"]["num_blocks"]
    assert len(stats) == 2 * blocks  # running mean and variance of every convolution module's BatchNorm
    base = load_file(str(recipe / "exp/conformer/nf4/model.safetensors"))
    latest = torch.load(out / "train/latest.pth", map_location="cpu")  # training's running averages
    for key, value in stats.items():  # estimated afresh: neither the base's nor training's running average
        name = key.removeprefix("pqm_batchnorm.")
        assert not torch.equal(value, base[name]) and not torch.equal(value, latest[name]), key

    def same_as(checkpoint: str) -> dict:
        """Adapter tensor -> equal to its twin in an ESPnet epoch file (which names the peft adapter 'default')?"""
        state = torch.load(out / "train" / checkpoint, map_location="cpu")
        return {key: torch.equal(value, state[re.sub(r"\.lora_([AB])\.", r".lora_\1.default.", key)].to(value.dtype))
                for key, value in tensors.items()}

    assert not all(same_as("latest.pth").values())  # not the last epoch's adapter...
    assert all(same_as("train.optim0_lr0.best.pth").values())  # ...but the best one's, tensor for tensor

    # Stage 8's recogniser puts the speaker's statistics in with its adapter, and the base's back for an
    # adapter without any (the pretrained LoRA, BatchNorm frozen), so no speaker's statistics reach the next.
    from pqm_ext.asr.recognizer import Recognizer
    from pqm_ext.lora.io import adapter_config_of

    decode_conf = yaml.safe_load((REPO / "egs/TEMPLATE/conf/conformer/decode.yaml").read_text())
    rec = Recognizer(exp / "nf4", decode_conf, adapter=adapter_config_of(out / "adapter"))
    buffers = dict(rec.model.named_buffers())

    def statistics_are(expected: dict) -> bool:
        return all(torch.equal(buffers[key.removeprefix("pqm_batchnorm.")], value.to(torch.float32))
                   for key, value in expected.items())

    base_stats = {key: base[key.removeprefix("pqm_batchnorm.")] for key in stats}
    assert statistics_are(base_stats) and not statistics_are(stats)
    with rec.speaker(out / "adapter"):
        assert statistics_are(stats)
    rec.use_adapter(exp / "lora_pretrain/adapter")
    assert statistics_are(base_stats)


def test_a_quantised_conformer_decodes_from_any_directory(recipe, tmp_path, monkeypatch):
    """The quantised model directory carries the base's sentencepiece model: the Python API, run from
    elsewhere than the recipe (whose relative path config.yaml names), gives stage 8's hypotheses."""
    from pqm_ext.asr.recognizer import Recognizer
    from pqm_ext.data.audio import read_audio
    from pqm_ext.data.kaldi_dir import read_data_dir

    exp = recipe / "exp/conformer"
    assert (exp / "nf4/bpe.model").read_bytes() == (exp / "base/bpe.model").read_bytes()
    data = read_data_dir(recipe / "dump/raw/sa_test")
    hyp_file = sorted((exp / "decode/nf4/hyp").glob("*.txt"))[0]
    stage8 = dict(line.split(" ", 1) if " " in line else (line, "") for line in hyp_file.read_text().splitlines())
    monkeypatch.chdir(tmp_path)
    rec = Recognizer(exp / "nf4", yaml.safe_load((REPO / "egs/TEMPLATE/conf/conformer/decode.yaml").read_text()))
    utt = sorted(stage8)[0]
    wav = data.wav_scp[utt]
    speech, _ = read_audio(wav if os.path.isabs(wav) else str(recipe / wav))
    assert rec(speech).strip() == stage8[utt]

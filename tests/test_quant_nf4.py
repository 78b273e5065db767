"""Block-wise NF4 / FP4 / uniform int-k quantisation checked against an independent reference.

The reference is written here from the definitions: QLoRA's NF4 levels (normal quantiles, 8
positive and 7 negative levels plus an exact zero, scaled into [-1, 1]); one absmax scale per
``blocksize`` consecutive weights of the row-major flattened tensor; each weight mapped to the
nearest level. The library's packed 4-bit codes, scales and dequantised values must match it
exactly, for every layer type the library quantises and for shapes that trip bitsandbytes' CPU kernel.
"""
from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F

from pqm_ext.quant import QuantConfig, quantize_model, set_dequant_cache
from pqm_ext.quant.cache import as_input_dtype
from pqm_ext.quant.layers import QuantConv, QuantEmbedding, QuantLinear
from pqm_ext.quant.nf4 import NF4Linear, NF4Store, _params4bit_bytes, dequantize_params4bit
from pqm_ext.quant.uniform import UniformStore


# --------------------------------------------------------------------------- the reference
def qlora_nf4_levels() -> torch.Tensor:
    """NF4 from its definition (Dettmers et al. 2023, QLoRA, sec. 3 / appendix E), in float64.

    Quantiles of N(0, 1) at probabilities spaced evenly from ``offset`` down to 0.5: 8 for the
    positive half and 7 for the negative half (so the data type is asymmetric and 0 is exact),
    normalised by the largest magnitude. ``offset`` is the mean of 1 - 1/(2*15) and 1 - 1/(2*16).
    """
    offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return levels / levels.abs().max()


def reference_blockwise(weight: torch.Tensor, levels: torch.Tensor, blocksize: int):
    """(level index per weight, absmax per block) of a row-major flattened weight."""
    flat = weight.detach().float().reshape(-1)
    blocks = F.pad(flat, (0, (-flat.numel()) % blocksize)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax[:, None]
    idx = (normed[..., None] - levels.float()).abs().argmin(dim=-1)
    return idx.reshape(-1)[: flat.numel()], absmax


def reference_dequantize(idx, absmax, code, blocksize, shape):
    values = code[idx]
    values = F.pad(values, (0, (-values.numel()) % blocksize)).reshape(-1, blocksize) * absmax[:, None]
    return values.reshape(-1)[: shape.numel()].reshape(shape)


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bitsandbytes packs two 4-bit codes per byte, the first in the high nibble."""
    b = packed.reshape(-1).long()
    return torch.stack([b >> 4, b & 0x0F], dim=1).reshape(-1)[:n]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- helpers
class OneLayer(torch.nn.Module):
    """A container so that ``quantize_model`` can replace the layer (``net.layer``)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer


LAYERS = {
    # name: (factory, the weight shape it has)
    "linear": lambda: torch.nn.Linear(256, 128),
    "linear_cols_not_multiple_of_block": lambda: torch.nn.Linear(240, 384),  # bnb CPU bug shape
    "conv1d_pointwise": lambda: torch.nn.Conv1d(64, 96, 1),
    "conv1d_whisper_front": lambda: torch.nn.Conv1d(80, 384, 3, padding=1),  # 384 x 240 flattened
    "conv2d_subsampling": lambda: torch.nn.Conv2d(1, 16, 3, stride=2),  # 16 x 9 flattened
    "embedding_odd_vocab": lambda: torch.nn.Embedding(51, 64),
}


QUANTISED_TYPE = {"linear": NF4Linear, "conv1d": QuantConv, "conv2d": QuantConv, "embedding": QuantEmbedding}


def gaussian_layer(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = LAYERS[name]()
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.05)
    return layer


def packed_weight(layer: torch.nn.Module):
    """The Params4bit holding a quantised layer's weight (NF4Linear or an NF4Store)."""
    if isinstance(layer, NF4Linear):
        return layer.weight
    assert isinstance(layer.store, NF4Store), type(layer.store)
    return layer.store.weight


# --------------------------------------------------------------------------- NF4 levels
def test_nf4_levels_follow_qlora_definition():
    ours = qlora_nf4_levels()
    bnb_code = bnbF.get_4bit_type("nf4", device="cpu").double()
    assert ours.numel() == 16
    assert (ours > 0).sum() == 8 and (ours < 0).sum() == 7, "NF4 is asymmetric: 8 positive, 7 negative levels"
    assert ours[7] == 0.0 and bnb_code[7] == 0.0, "zero must be represented exactly"
    assert ours[0] == -1.0 and ours[-1] == 1.0
    torch.testing.assert_close(bnb_code, ours, rtol=0, atol=1e-6)  # bnb hard-codes them in float32


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("name", list(LAYERS))
def test_blockwise_nf4_matches_reference_bit_for_bit(name, blocksize):
    layer = gaussian_layer(name)
    weight = layer.weight.detach().clone()
    net = OneLayer(layer)
    quantize_model(net, QuantConfig(method="nf4", blocksize=blocksize))
    q = net.layer
    assert isinstance(q, QUANTISED_TYPE[name.split("_")[0]])
    param = packed_weight(q)
    assert param.quant_state.blocksize == blocksize

    idx, absmax = reference_blockwise(weight, qlora_nf4_levels(), blocksize)
    assert param.quant_state.absmax.numel() == -(-weight.numel() // blocksize)
    assert torch.equal(param.quant_state.absmax, absmax), "absmax per block differs from the reference"
    assert torch.equal(unpack_codes(param.data, weight.numel()), idx), "4-bit codes differ from nearest-level"

    # Dequantised values: the reference's levels as bitsandbytes stores them (checked above to 1e-6).
    code = bnbF.get_4bit_type("nf4", device="cpu")
    expected = reference_dequantize(idx, absmax, code, blocksize, weight.shape)
    got = q.dequantize_weight() if isinstance(q, NF4Linear) else q.weight
    assert got.shape == weight.shape
    assert torch.equal(got, expected)
    assert rel_err(got, weight) < 0.11  # 4-bit on Gaussian weights: about 0.09-0.10


def test_blocksize_changes_the_scales():
    """The blocksize option reaches bitsandbytes: another blocksize gives other scales and values."""
    weights = {}
    for bs in (64, 256):
        layer = gaussian_layer("linear")
        net = OneLayer(layer)
        quantize_model(net, QuantConfig(blocksize=bs))
        assert net.layer.weight.quant_state.absmax.numel() == 256 * 128 // bs
        weights[bs] = net.layer.dequantize_weight()
    assert not torch.equal(weights[64], weights[256])
    original = gaussian_layer("linear").weight.detach()
    assert rel_err(weights[64], original) < rel_err(weights[256], original)  # smaller blocks, finer scales


def test_nf4_layer_forward_uses_the_dequantised_weight():
    layer = gaussian_layer("linear_cols_not_multiple_of_block")
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    net = OneLayer(layer)
    quantize_model(net, QuantConfig())
    idx, absmax = reference_blockwise(weight, qlora_nf4_levels(), 64)
    ref_w = reference_dequantize(idx, absmax, bnbF.get_4bit_type("nf4", device="cpu"), 64, weight.shape)
    x = torch.randn(5, 240)
    # Unquantised parameters are rounded to the storage dtype (float16 by default).
    torch.testing.assert_close(net.layer(x), F.linear(x, ref_w, bias.half().float()), rtol=1e-6, atol=1e-6)


def test_cached_nf4_layers_under_autocast_match_a_dense_linear():
    """On a GPU the fast path runs fp16 copies under autocast, where inputs after a LayerNorm are float32.
    The cached layers must then leave casting to autocast (no widening of the weight) and give what a
    dense ``nn.Linear`` holding the dequantised weight gives: same dtype, same values. CPU autocast with
    bfloat16 exercises the same code."""
    layer = gaussian_layer("linear_cols_not_multiple_of_block")
    net = OneLayer(layer)
    quantize_model(net, QuantConfig())
    set_dequant_cache(net, True, dtype=torch.bfloat16)
    dense = torch.nn.Linear(240, layer.out_features)
    with torch.no_grad():
        dense.weight.copy_(net.layer.cached_weight())
        dense.bias.copy_(net.layer.bias)
    dense.to(torch.bfloat16)
    x = torch.randn(5, 240)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert as_input_dtype(net.layer.cached_weight(), x) is net.layer.cached_weight()
        got, want = net.layer(x), dense(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert net.layer(x).dtype == torch.float32  # without autocast: the input's dtype, as before


# --------------------------------------------------------------------------- bitsandbytes CPU bug
@pytest.mark.parametrize("shape", [(384, 240), (64, 48), (100, 96)])
def test_cpu_dequantize_bug_is_worked_around(shape):
    """bnb 0.50.2's CPU kernel, on the AVX512 machines it was found on, dequantises row by row, wrong when a
    row is not whole blocks (even widths; odd ones take a generic path). Whisper's first convolution
    (384 x 80 x 3) is such a shape. On an AMD EPYC without AVX512 bitsandbytes was right: the toolkit's
    dequantisation must be exact on both."""
    torch.manual_seed(1)
    weight = torch.randn(shape)
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    idx, absmax = reference_blockwise(weight, qlora_nf4_levels(), 64)
    expected = reference_dequantize(idx, absmax, bnbF.get_4bit_type("nf4", device="cpu"), 64, weight.shape)

    store = NF4Store(shape, weight=weight)
    assert torch.equal(store.dequantize_weight(), expected)
    assert torch.equal(dequantize_params4bit(store.weight), expected)
    assert rel_err(store.dequantize_weight(), weight) < 0.11
    raw = bnbF.dequantize_4bit(packed, state)  # bitsandbytes alone: right or, with the AVX512 kernel, far off
    assert torch.allclose(raw, expected, atol=1e-3) or rel_err(raw, weight) > 0.11


# --------------------------------------------------------------------------- NF4 vs uniform int4
def reference_uniform(weight: torch.Tensor, bits: int, blocksize: int) -> torch.Tensor:
    """Symmetric round-to-nearest onto {-(2^(b-1)-1) .. 2^(b-1)-1} * absmax / (2^(b-1)-1) per block."""
    flat = weight.reshape(-1).float()
    blocks = F.pad(flat, (0, (-flat.numel()) % blocksize)).reshape(-1, blocksize)
    qmax = 2 ** (bits - 1) - 1
    scale = blocks.abs().amax(dim=1, keepdim=True) / qmax  # float32 like the scales stored
    deq = torch.round(blocks / scale).clamp(-qmax, qmax) * scale
    return deq.reshape(-1)[: flat.numel()].reshape(weight.shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(128, 256), (51, 64), (384, 80, 3), (7, 9)])
def test_uniform_store_matches_reference(bits, shape):
    torch.manual_seed(2)
    weight = torch.randn(shape)
    store = UniformStore(shape, bits=bits, blocksize=64, weight=weight)
    torch.testing.assert_close(store.dequantize_weight(), reference_uniform(weight, bits, 64), rtol=1e-6, atol=1e-6)
    n = weight.numel()
    assert store.stored_bytes() == (-(-n // 2) if bits <= 4 else n) + 4 * -(-n // 64)


def test_nf4_error_below_uniform_int4_on_gaussian_weights():
    torch.manual_seed(3)
    weight = torch.randn(512, 512) * 0.02
    nf4 = NF4Store(weight.shape, weight=weight).dequantize_weight()
    int4 = UniformStore(weight.shape, bits=4, blocksize=64, weight=weight).dequantize_weight()
    e_nf4, e_int4 = rel_err(nf4, weight), rel_err(int4, weight)
    # Normal-quantile levels fit Gaussian weights better than an even grid of 15 levels.
    assert e_nf4 < 0.9 * e_int4, (e_nf4, e_int4)  # measured 0.092 vs 0.108
    assert 0.07 < e_nf4 < 0.11 and 0.10 < e_int4 < 0.15, (e_nf4, e_int4)


# --------------------------------------------------------------------------- double quantisation, FP4
@pytest.mark.parametrize("kind", ["linear", "store"])
def test_double_quantisation_smaller_and_close(kind):
    torch.manual_seed(4)
    weight = torch.randn(512, 256) * 0.02
    deq, nbytes = {}, {}
    for dq in (False, True):
        if kind == "linear":
            lin = torch.nn.Linear(256, 512)
            lin.weight.data.copy_(weight)
            net = OneLayer(lin)
            quantize_model(net, QuantConfig(double_quant=dq))
            param, deq[dq] = net.layer.weight, net.layer.dequantize_weight()
        else:
            store = NF4Store(weight.shape, double_quant=dq, weight=weight)
            param, deq[dq] = store.weight, store.dequantize_weight()
        assert param.quant_state.nested is dq
        nbytes[dq] = _params4bit_bytes(param)
    n = weight.numel()
    blocks = n // 64
    assert nbytes[False] == n // 2 + 4 * blocks + 16 * 4  # codes + float32 absmax + NF4 code book
    # 8-bit absmax, float32 scale per 256 absmax, NF4 + 8-bit code books
    assert nbytes[True] == n // 2 + blocks + 4 * -(-blocks // 256) + 16 * 4 + 256 * 4
    # 4.5 bits per weight -> about 4.19 here (4.127 plus the per-layer code books)
    assert 8 * nbytes[False] / n > 4.5 and 8 * nbytes[True] / n < 4.2
    assert rel_err(deq[True], deq[False]) < 0.01
    assert rel_err(deq[True], weight) < 1.02 * rel_err(deq[False], weight)


def test_fp4_option_quantises_to_fp4_levels():
    layer = gaussian_layer("linear")
    weight = layer.weight.detach().clone()
    net = OneLayer(layer)
    quantize_model(net, QuantConfig(method="fp4"))
    q = net.layer
    assert isinstance(q, NF4Linear) and q.weight.quant_state.quant_type == "fp4"
    code = bnbF.get_4bit_type("fp4", device="cpu")
    assert not torch.equal(code.sort().values, bnbF.get_4bit_type("nf4", device="cpu").sort().values)
    idx, absmax = reference_blockwise(weight, code.double(), 64)
    expected = reference_dequantize(idx, absmax, code, 64, weight.shape)
    assert torch.equal(q.dequantize_weight(), expected)
    e_fp4 = rel_err(q.dequantize_weight(), weight)
    assert e_fp4 < 0.15
    x = torch.randn(3, 256)
    torch.testing.assert_close(q(x), F.linear(x, expected, layer.bias.detach().half().float()), rtol=1e-6, atol=1e-6)


def test_quant_config_rejects_bad_options():
    for bad in (dict(method="nf3"), dict(blocksize=48), dict(method="int", bits=1),
                dict(method="int", double_quant=True),
                dict(layers=["linear", "lstm"]), dict(storage_dtype="float12")):
        with pytest.raises(ValueError):
            QuantConfig(**bad)
    with pytest.raises(ValueError, match="unknown quantisation option"):
        QuantConfig.from_dict({"method": "nf4", "block_size": 64})


@pytest.mark.parametrize("method", ["nf4", "int"])
def test_uniform_and_nf4_layers_types(method):
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Conv1d(64, 64, 1), torch.nn.Embedding(10, 64))
    names = quantize_model(net, QuantConfig(method=method))
    assert names == ["0", "1", "2"]
    assert isinstance(net[0], NF4Linear if method == "nf4" else QuantLinear)
    assert isinstance(net[1], QuantConv) and isinstance(net[2], QuantEmbedding)
    assert isinstance(net[1].store, NF4Store if method == "nf4" else UniformStore)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_fused_kernel_matches_cpu_path():
    layer = gaussian_layer("linear")
    net = OneLayer(layer)
    quantize_model(net, QuantConfig())
    x = torch.randn(4, 256)
    cpu = net.layer(x)
    net.cuda()
    torch.testing.assert_close(net.layer(x.cuda()).cpu(), cpu, rtol=1e-3, atol=1e-3)

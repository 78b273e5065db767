"""Fast decoding paths give the hypotheses of the reference paths (issue 7).

* fast path (incremental Whisper decoder + dequantisation cache) == plain path (ESPnet's full
  recomputation of every prefix, weights dequantised on every call), through ``Speech2Text``, for
  NF4 + LoRA at beam 1 and 2;
* batched greedy decoding == ``Speech2Text`` greedy decoding, one utterance at a time (utterances
  longer than the 8 s window included);
* mixed-speaker batches (each row its own adapter; our batched LoRA and peft's) == per-speaker
  decoding with the adapter loaded, at the layer level and in stage 8 (``--mixed_batch``);
* an adapter folded into the dequantised weight == the unmerged adapter, also as stage 8 decodes one
  speaker (``Recognizer.speaker``, ``--fold_adapters``).

All on Whisper tiny.en (real weights) quantised to NF4, with synthesised speech and adapters whose B
matrices are random (peft initialises B to zero, which would make every adapter the identity).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from lora_helpers import one_adapter_at_a_time
from safetensors import safe_open
from safetensors.torch import save_file

from pqm_ext.asr.batch_decode import NotGreedyError, batch_decode, check_greedy, greedy_search
from pqm_ext.lora import AdapterConfig, save_adapter
from pqm_ext.lora.io import WEIGHTS
from pqm_ext.lora.mixed import folded, lora_layers, load_adapters
from pqm_ext.quant import set_dequant_cache

# The recipe's decoding config (egs/TEMPLATE/conf/whisper/decode.yaml): greedy, with a length guard of
# 8 tokens per second of unpadded audio that the Recognizer turns into a maxlenratio per utterance.
GREEDY = dict(beam_size=1, ctc_weight=0.0, lm_weight=0.0, penalty=0.0, max_tokens_per_second=8, minlenratio=0.0,
              nbest=1)
ADAPTER = AdapterConfig(rank=2, alpha=4.0, target_modules=["attn.query", "attn.key", "attn.value", "attn.out",
                                                            "mlp.0", "mlp.2"])
SPEAKERS = ("s0", "s1", "s2")


@pytest.fixture(scope="module")
def nf4_dir(whisper_base_dir, tmp_path_factory):
    from pqm_ext.bin.quantize import quantize_dir

    d = tmp_path_factory.mktemp("perf_nf4")
    (d / "quant.yaml").write_text(yaml.safe_dump({"quant_conf": {"method": "nf4"}}))
    return quantize_dir(whisper_base_dir, d / "quant.yaml", d / "nf4")


@pytest.fixture(scope="module")
def adapter_dirs(nf4_dir, tmp_path_factory):
    """Three speakers' adapters on the NF4 base, with random B (seeded)."""
    from pqm_ext.asr.recognizer import Recognizer

    rec = Recognizer(nf4_dir, GREEDY, adapter=ADAPTER)
    root = tmp_path_factory.mktemp("perf_adapters")
    out = {}
    for i, spk in enumerate(SPEAKERS):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lora_layers(rec.model):
                b = layer.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
        out[spk] = save_adapter(rec.model, root / spk, ADAPTER, info={"speaker": spk})
    return out


@pytest.fixture(scope="module")
def utterances(synth, sentences):
    """Three short sentences and one 9 s utterance (longer than the encoder's 8 s window)."""
    wavs = [sf.read(synth(s), dtype="float32")[0] for s in sentences]
    long = np.concatenate(wavs * 3)[: 9 * 16000]
    assert len(long) == 9 * 16000
    return wavs + [long]


@pytest.fixture(scope="module")
def rec(nf4_dir, adapter_dirs):
    """NF4 tiny.en with the "default" adapter slot (per-speaker reference) and the three speakers
    loaded side by side for mixed batches (``rec.mixed``)."""
    from pqm_ext.asr.recognizer import Recognizer

    r = Recognizer(nf4_dir, GREEDY, adapter=ADAPTER)
    r.mixed = load_adapters(r.model, adapter_dirs)
    return r


def _per_speaker(rec, adapter_dirs, wavs, spks):
    out = []
    for w, s in zip(wavs, spks):
        rec.use_adapter(adapter_dirs[s])
        out.append(rec(w))
    return out


# --------------------------------------------------------------------------- fast == plain
@pytest.mark.parametrize("beam", [1, 2])
def test_fast_path_gives_the_plain_paths_hypotheses(rec, adapter_dirs, utterances, beam):
    rec.use_adapter(adapter_dirs["s1"])
    s2t, dec = rec.s2t, rec.model.decoder
    s2t.beam_search.beam_size = beam
    # A beam of 2 refills itself after a hypothesis ends and runs to the length guard: keep it short.
    s2t.maxlenratio = 0.15 if beam == 1 else 0.04
    wavs = utterances[:1] if beam == 1 else utterances[2:3]
    try:
        set_dequant_cache(rec.model, True)
        fast = [s2t(w)[0] for w in wavs]
        set_dequant_cache(rec.model, False)
        dec.incremental = False
        plain = [s2t(w)[0] for w in wavs]
    finally:
        s2t.beam_search.beam_size, s2t.maxlenratio = 1, 0.15
        dec.incremental = True
        set_dequant_cache(rec.model, True)
    for f, p in zip(fast, plain):
        assert f[0] == p[0]
        assert torch.equal(f[3].yseq, p[3].yseq)
        assert abs(float(f[3].score) - float(p[3].score)) < 1e-3
    assert any(f[0].strip() for f in fast)


# --------------------------------------------------------------------------- batched == Speech2Text
def test_batched_greedy_equals_speech2text_greedy(rec, adapter_dirs, utterances):
    rec.use_adapter(adapter_dirs["s0"])  # NF4 + LoRA, the adapter of the "default" slot
    ref = [rec(w) for w in utterances]
    hyps = batch_decode(rec, utterances, batch_size=8)  # the 9 s utterance is a batch of its own
    assert hyps == ref
    assert batch_decode(rec, utterances[:2], batch_size=1) == ref[:2]
    assert all(h.strip() for h in hyps)


def test_length_guard_and_forced_steps(rec, utterances):
    model = rec.model
    w = torch.from_numpy(utterances[0])[None]
    n = torch.tensor([w.size(1)])
    primer = list(rec.s2t.beam_search.hyp_primer)
    eos = rec.s2t.beam_search.eos
    with rec.mixed.rows([None]):
        ids, steps = greedy_search(model, w, n, primer=primer, eos=eos, maxlenratio=-3)
        assert len(ids[0]) <= 3 and steps <= 3
        ids, steps = greedy_search(model, w, n, primer=primer, eos=eos, force_steps=25)
        assert len(ids[0]) == 25 and steps == 25


# --------------------------------------------------------------------------- mixed == per speaker
@pytest.mark.parametrize("impl", ["batched", "peft"])
def test_mixed_rows_match_one_adapter_at_a_time(rec, impl):
    """Layer level: row i of a mixed batch is exactly what adapter names[i] alone computes."""
    mixed = rec.mixed
    name, layer = [(n, m) for n, m in lora_layers(rec.model) if n.endswith("decoders.blocks.1.mlp.0")][0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, layer.in_features, generator=g)
    names = ["s2", None, "s0", "s2"]
    with torch.no_grad():
        with mixed.rows(names, impl=impl):
            got = layer(x)
        want = one_adapter_at_a_time(mixed, layer, x, names)
        for _, m in lora_layers(rec.model):  # back to the per-speaker slot for the other tests
            m.set_adapter("default")
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want[0], want[2], atol=1e-4)  # the adapters really differ


def test_mixed_batch_decoding_equals_per_speaker_decoding(rec, adapter_dirs, utterances):
    spks = ["s2", "s0", "s1"]
    wavs = utterances[:3]
    ref = _per_speaker(rec, adapter_dirs, wavs, spks)
    for impl in ("batched", "peft"):
        rec.mixed.impl = impl
        try:
            hyps = batch_decode(rec, wavs, adapter_names=spks, mixed=rec.mixed, batch_size=4)
        finally:
            rec.mixed.impl = "batched"
        assert hyps == ref, impl


def test_folded_adapter_equals_unmerged_adapter(rec, adapter_dirs, utterances):
    rec.use_adapter(adapter_dirs["s2"])
    layer = [m for n, m in lora_layers(rec.model) if n.endswith("encoders.blocks.0.attn.query")][0]
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = layer(x)
        unfolded = rec(utterances[1])
        with folded(rec.model, "default") as n:
            assert n == len(lora_layers(rec.model))
            got = layer(x)
            assert layer.get_base_layer()._dequant_cache is None  # the folded copy replaces the cache
            hyp = rec(utterances[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert hyp == unfolded
    torch.testing.assert_close(layer(x), want)  # unfolded again


def test_speaker_block_folds_its_adapter_and_restores_the_layers(rec, adapter_dirs, utterances):
    """``Recognizer.speaker`` (stage 8's per-speaker decoding): the speaker's adapter is loaded and folded
    for the block, the hypothesis is the unmerged adapter's, and the layers are peft's again after."""
    layer = [m for n, m in lora_layers(rec.model) if n.endswith("decoders.blocks.0.mlp.0")][0]
    rec.use_adapter(adapter_dirs["s0"])
    unmerged = rec(utterances[0])
    rec.use_adapter(adapter_dirs["s1"])  # the block must load s0 itself
    with rec.speaker(adapter_dirs["s0"]):
        assert "folded_weight" in layer.__dict__
        folded_hyp = rec(utterances[0])
    assert "folded_weight" not in layer.__dict__ and "forward" not in layer.__dict__
    assert folded_hyp == unmerged and rec.adapter_dir == str(adapter_dirs["s0"])
    with rec.speaker(adapter_dirs["s0"], fold=False):
        assert "folded_weight" not in layer.__dict__
        assert rec(utterances[0]) == unmerged


def test_folded_copy_keeps_the_cache_dtype(rec, adapter_dirs):
    """On a GPU the cache holds fp16 copies; the folded copy must too (one rounding, after the sum), not
    the float32 that the 4-bit state dequantises to. bfloat16 stands in for fp16 on the CPU."""
    rec.use_adapter(adapter_dirs["s2"])
    layer = [m for n, m in lora_layers(rec.model) if n.endswith("encoders.blocks.0.attn.query")][0]
    base = layer.get_base_layer()
    want = (base.dequantize_weight() + layer.get_delta_weight("default")).to(torch.bfloat16)
    set_dequant_cache(rec.model, True, dtype=torch.bfloat16)
    try:
        with torch.no_grad(), folded(rec.model, "default"):
            assert layer.folded_weight.dtype == torch.bfloat16
            torch.testing.assert_close(layer.folded_weight, want, rtol=0, atol=0)
        assert "folded_weight" not in layer.__dict__
    finally:
        set_dequant_cache(rec.model, True)


# --------------------------------------------------------------------------- stage 8
def test_stage8_mixed_batch_gives_the_per_speaker_hypotheses(nf4_dir, adapter_dirs, utterances, tmp_path):
    import shutil

    from pqm_ext.bin import decode as decode_bin
    from pqm_ext.data.kaldi_dir import DataDir

    exp = tmp_path / "exp"
    shutil.copytree(nf4_dir, exp / "nf4")
    for spk in SPEAKERS[:2]:  # B 10x the fixture's, so that each speaker's adapter changes its greedy output
        weights = shutil.copytree(adapter_dirs[spk], exp / "adapt/pretrained/n2" / spk / "adapter") / WEIGHTS
        with safe_open(str(weights), "pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file({k: v * 10 if ".lora_B." in k else v for k, v in tensors.items()}, str(weights), metadata=metadata)
    data = tmp_path / "data"
    data.mkdir()
    wav_scp, utt2spk, text = {}, {}, {}
    for i, (spk, w) in enumerate([("s0", 0), ("s1", 1)]):
        utt = f"{spk}-u{i}"
        sf.write(tmp_path / f"{utt}.wav", utterances[w], 16000)
        wav_scp[utt], utt2spk[utt], text[utt] = str(tmp_path / f"{utt}.wav"), spk, "X"
    DataDir(wav_scp=wav_scp, text=text, utt2spk=utt2spk).write(data)
    conf = tmp_path / "decode.yaml"
    conf.write_text(yaml.safe_dump(GREEDY))
    common = ["--exp_dir", str(exp), "--data", str(data), "--speakers", "s0", "s1", "--nutts", "2", "--inits",
              "pretrained", "--decode_config", str(conf)]
    decode_bin.main(common + ["--out_dir", str(tmp_path / "base"), "--systems", "nf4"])
    common += ["--systems", "pqm_n2"]
    decode_bin.main(common + ["--out_dir", str(tmp_path / "one")])  # adapters folded (the default)
    decode_bin.main(common + ["--out_dir", str(tmp_path / "unmerged"), "--fold_adapters", "false"])
    decode_bin.main(common + ["--out_dir", str(tmp_path / "mixed"), "--mixed_batch", "4"])
    for spk in ("s0", "s1"):
        hyp = {d: (tmp_path / d / "pqm_n2" / "hyp" / f"{spk}.txt").read_text() for d in ("one", "unmerged", "mixed")}
        assert hyp["one"] == hyp["unmerged"] == hyp["mixed"] and len(hyp["one"].splitlines()) == 1
        info = {d: json.loads((tmp_path / d / "pqm_n2" / "hyp" / f"{spk}.json").read_text()) for d in hyp}
        assert info["one"]["adapter_folded"] and not info["unmerged"]["adapter_folded"]
        assert info["mixed"]["mixed_batch"] == 4 and info["mixed"]["utts"] == 1
    # ... and they are the adapters' hypotheses: the three paths would also agree if each ignored them
    base = {spk: (tmp_path / "base/nf4/hyp" / f"{spk}.txt").read_text() for spk in ("s0", "s1")}
    assert any((tmp_path / "one/pqm_n2/hyp" / f"{spk}.txt").read_text() != base[spk] for spk in base), base
    # a beam search config cannot be batched greedily: a clear input error naming the config
    conf.write_text(yaml.safe_dump({**GREEDY, "beam_size": 2}))
    with pytest.raises(SystemExit):
        decode_bin.main(common + ["--out_dir", str(tmp_path / "beam"), "--mixed_batch", "4"])


def test_check_greedy_names_the_problem(rec):
    check_greedy(rec.s2t)
    rec.s2t.beam_search.beam_size = 3
    try:
        with pytest.raises(NotGreedyError, match="beam_size=3"):
            check_greedy(rec.s2t)
    finally:
        rec.s2t.beam_search.beam_size = 1


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_mixed_batch_matches_cpu(nf4_dir, adapter_dirs, utterances):
    from pqm_ext.asr.recognizer import Recognizer

    spks = ["s0", "s1", "s2", "s0"]
    wavs = utterances[:3] + [utterances[3]]
    cpu = Recognizer(nf4_dir, GREEDY)
    want = batch_decode(cpu, wavs, adapter_names=spks, mixed=load_adapters(cpu.model, adapter_dirs), batch_size=4)
    gpu = Recognizer(nf4_dir, GREEDY, device="cuda")
    mixed = load_adapters(gpu.model, adapter_dirs)
    gpu.model.to("cuda")
    got = batch_decode(gpu, wavs, adapter_names=spks, mixed=mixed, batch_size=4)
    assert got == want


@pytest.mark.gpu
def test_gpu_fp16_batched_decoding_runs(nf4_dir, utterances):
    from pqm_ext.asr.recognizer import Recognizer

    gpu = Recognizer(nf4_dir, GREEDY, device="cuda")
    gpu.model.half()
    set_dequant_cache(gpu.model, True, dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        hyps = batch_decode(gpu, utterances[:3], batch_size=3)
    assert all(h.strip() for h in hyps)

"""Decoding speed and memory: full precision vs NF4 (plain / fast) vs NF4 + LoRA, batch 1 and 32.

Models (ESPnet models built by PQMASRTask / ASRTask, decoded greedily by pqm_ext.asr.batch_decode):
  whisper_tiny  Whisper tiny.en with its real weights: the demo experiment's base and stage-5 NF4 model
                (egs/librispeech_sa/exp/whisper) when present, else the bundled tiny.en converted and
                quantised in a temp dir; the LoRA is a real stage-7 adapter when the demo has one. Where
                neither exists (a GPU machine without them), tiny.en dimensions with random weights.
  whisper_base  Whisper base.en dimensions, random weights.
All models decode a forced length (--steps tokens per utterance, end-of-text ignored), so every
variant does the same work (natural-length decoding: bench/multi_speaker.py, docs/PERFORMANCE.md).
  conformer     the recipe's paper-sized Conformer AED (egs/TEMPLATE/conf/conformer/model_ls100.yaml,
                5000 BPE units), random weights, forced-length greedy decoding with the attention
                decoder only (ESPnet's TransformerDecoder.forward_one_step with its layer cache; no CTC
                prefix scoring, which the recipe's beam search adds).
Utterances: the demo test set (utterances of at most 8 s) or, without it, flite sentences; Whisper
pads them to its 8 s window (the recipe's pad_to_seconds).

Variants (CPU; on a GPU fp16 replaces fp32 and runs under float16 autocast):
  fp32 / fp16       full precision
  nf4_plain         NF4 (bitsandbytes), every layer dequantised on every call; Whisper's decoder
                    recomputes every prefix (ESPnet's OpenAIWhisperDecoder scoring)
  nf4_fast          + dequantisation cache (each layer dequantised once, kept) and the incremental
                    Whisper decoder (self-attention states, cross-attention keys/values once per batch)
  nf4_cache         (Whisper, batch 1 only) the cache alone, prefixes recomputed: what the cache buys
  nf4_incr          (Whisper, batch 1 only) the incremental decoder alone, no cache
  nf4_fast_dec      nf4_fast with the cache on the decoder only (the encoder runs once per batch and
                    dequantises per call): less memory
  nf4_lora          nf4_fast + a rank-4 LoRA adapter (peft, unmerged)
  nf4_lora_fold     nf4_lora with the adapter folded into the dequantised weights (W + B A s)
  nf4_lora_compile  nf4_lora with torch.compile on the decoder's step (CPU inductor; --compile)
Each (model, device, variant) runs in its own process, so peak memory is its own: peak RSS on the CPU
(VmHWM, reset before each run), torch.cuda.max_memory_allocated on a GPU. With --interleave all variants
of a model share one process and are timed in rotating rounds: on a GPU, separate processes of the same
variant were seen 1.3-1.5x apart, which swamps the ratios this benchmark is for. "weights MB" counts
parameters, buffers and quantisation state; "cache MB" the dequantised copies held after the run.
Times exclude one warm-up utterance (it fills the caches once per process, and compiles): "warm s".

Usage:
    OMP_NUM_THREADS=1 python bench/decode_speed.py                 # all models, CPU (+ GPU if present)
    python bench/decode_speed.py --models whisper_tiny --variants fp32 nf4_fast --batches 1
    python bench/decode_speed.py --device cuda --compile           # GPU only, with torch.compile
    python bench/decode_speed.py --identity 4 --identity_model conformer   # fast == plain hypotheses on the demo
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The demo experiment the benchmarks read (PQM_BENCH_DEMO: another recipe dir of the same layout, e.g. a
# copy of exp/whisper/nf4 and dump/raw/sa_test taken to a GPU machine).
DEMO = Path(os.environ.get("PQM_BENCH_DEMO", ROOT / "egs" / "librispeech_sa")).resolve()
DEMO_EXP = DEMO / "exp" / "whisper"
DEMO_TEST = DEMO / "dump" / "raw" / "sa_test"

MODELS = ("whisper_tiny", "whisper_base", "conformer")
VARIANTS = ("fp", "nf4_plain", "nf4_cache", "nf4_incr", "nf4_fast", "nf4_fast_dec", "nf4_lora", "nf4_lora_fold",
            "nf4_lora_compile")
ATTRIBUTION = ("nf4_cache", "nf4_incr")  # Whisper only, batch 1 only
WHISPER_LORA = ["attn.query", "attn.key", "attn.value", "attn.out", "mlp.0", "mlp.2"]
CONFORMER_LORA = ["self_attn.linear_q", "self_attn.linear_k", "self_attn.linear_v", "self_attn.linear_out",
                  "src_attn.linear_q", "src_attn.linear_k", "src_attn.linear_v", "src_attn.linear_out",
                  "feed_forward.w_1", "feed_forward.w_2", "feed_forward_macaron.w_1", "feed_forward_macaron.w_2"]
# --pointwise: the convolution modules' pointwise convolutions too (the recipe's option, off by default)
CONFORMER_POINTWISE = ["conv_module.pointwise_conv1", "conv_module.pointwise_conv2"]
WHISPER_BASE_DIMS = dict(n_mels=80, n_vocab=51864, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8,
                         n_audio_layer=6, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6)
WHISPER_TINY_DIMS = {**WHISPER_BASE_DIMS, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4,
                     "n_text_state": 384, "n_text_head": 6, "n_text_layer": 4}
# The recipe's Whisper model config (stage 4 fills in the dims from the checkpoint).
WHISPER_CONF = yaml.safe_load((ROOT / "egs/TEMPLATE/conf/whisper/model.yaml").read_text())
MB = 1e6


# --------------------------------------------------------------------------- machine and load
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load1() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return -1.0


def wait_for_quiet(threshold: float, max_wait_s: float, poll_s: float = 30.0) -> str:
    """Wait until the 1-minute load average is below ``threshold``; return a note for the output."""
    t0 = time.time()
    while load1() >= threshold and time.time() - t0 < max_wait_s:
        time.sleep(poll_s)
    now = load1()
    waited = time.time() - t0
    if now >= threshold:
        return f"load {now:.2f} still >= {threshold} after waiting {waited:.0f} s: ran anyway (timings inflated)"
    return f"load {now:.2f} < {threshold} at start (waited {waited:.0f} s)"


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weight_bytes(model) -> Dict[str, int]:
    """Bytes of parameters + buffers + 4-bit quantisation state, and of dequantised copies."""
    from bitsandbytes.nn import Params4bit

    from pqm_ext.quant.cache import dequant_cache_bytes

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None) if isinstance(t, Params4bit) else None
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
            if qs.nested:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    cache = dequant_cache_bytes(model)
    cache += sum(m.folded_weight.numel() * m.folded_weight.element_size()  # folded LoRA copies
                 for m in model.modules() if getattr(m, "folded_weight", None) is not None)
    return {"weights": total, "cache": cache}


def run_worker(script: str, job: Dict, work: Path, label: str) -> Optional[Dict]:
    """Run ``script --worker job.json`` in a fresh process (its own peak memory); its RESULT, or None
    after printing why it failed."""
    (work / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, script, "--worker", str(work / "job.json")], capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(f"# {label} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[-1][len("RESULT "):])


# --------------------------------------------------------------------------- preparation (main process)
def whisper_token_list(work: Path) -> Path:
    from espnet2.bin.whisper_export_vocabulary import export_vocabulary

    path = work / "whisper_en.txt"
    if not path.is_file():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            export_vocabulary(output="-", whisper_model="whisper_en")
        path.write_text(buf.getvalue(), encoding="utf-8")
    return path


SENTENCES = ["Please call me tomorrow morning.", "The weather is very nice today.",
             "I would like a cup of coffee.", "She sells sea shells by the sea shore every summer.",
             "The quick brown fox jumps over the lazy dog.", "We will meet again at the station after lunch.",
             "Reading books before bed helps many people sleep.", "The meeting was moved to Thursday afternoon."]


def synth_utterances(work: Path, n: int) -> List[str]:
    """``n`` utterances from flite voices (16 kHz, 0.3 s of silence around), when no demo test set exists."""
    out = []
    voices = ["kal16", "slt", "rms", "awb"]
    for i in range(n):
        raw, wav = work / f"raw{i}.wav", work / f"utt{i}.wav"
        subprocess.run(["flite", "-voice", voices[i % len(voices)], "-t", SENTENCES[i % len(SENTENCES)],
                        "-o", str(raw)], check=True)
        subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav), "pad", "0.3", "0.3"],
                       check=True)
        out.append(str(wav))
    return out


def has_bundled_tiny() -> bool:
    try:
        from pqm_ext.models.ct2_whisper import bundled_tiny_en_dir

        return bundled_tiny_en_dir().is_dir()
    except ImportError:
        return False


def random_whisper(work: Path, name: str, dims: Dict) -> Dict:
    """Config and token list of a Whisper of these dimensions; ``build`` gives it seeded random weights."""
    conf = {**WHISPER_CONF, "encoder_conf": {**WHISPER_CONF["encoder_conf"], "dims": dims},
            "decoder_conf": {**WHISPER_CONF["decoder_conf"], "dims": dims}}
    (work / f"{name}.yaml").write_text(yaml.safe_dump(conf))
    return {"config": str(work / f"{name}.yaml"), "token_list": str(whisper_token_list(work))}


def prepare(work: Path, models: List[str], n_utts: int, need_fp: bool = True) -> Dict:
    """Model configs/dirs and the utterances, shared by the workers (``need_fp=False``: the NF4 Whisper
    tiny.en alone is needed, so the demo's NF4 model is used even without its full-precision base)."""

    spec: Dict = {"work": str(work)}
    # utterances
    wavs = []
    if (DEMO_TEST / "wav.scp").is_file():
        import soundfile as sf

        for line in (DEMO_TEST / "wav.scp").read_text().splitlines():
            utt, path = line.split(maxsplit=1)
            if sf.info(path).duration <= 8.0 and len(wavs) < max(n_utts, 32):
                wavs.append(str(shutil.copy(path, work / Path(path).name)))  # the recipe may rewrite the demo
        spec["speech_source"] = f"demo test set ({DEMO_TEST})"
    else:
        wavs = synth_utterances(work, max(n_utts, 32))
        spec["speech_source"] = "flite sentences (no demo test set)"
    spec["wavs"] = wavs[:max(n_utts, 32)]
    if "whisper_tiny" in models:
        has_fp = (DEMO_EXP / "base" / "model.safetensors").is_file()
        if (DEMO_EXP / "nf4" / "model.safetensors").is_file() and (has_fp or not need_fp):
            # copies: the recipe may rewrite the demo while a benchmark runs
            spec["tiny"] = {"nf4": str(shutil.copytree(DEMO_EXP / "nf4", work / "tiny_nf4")),
                            "source": "demo exp (exp/whisper/base, exp/whisper/nf4)"}
            if has_fp:
                spec["tiny"]["fp"] = str(shutil.copytree(DEMO_EXP / "base", work / "tiny_fp"))
            adapters = sorted((DEMO_EXP / "adapt" / "scratch" / "n20").glob("*/adapter/adapter_model.safetensors"))
            if adapters:
                src = adapters[0].parent
                spec["tiny"]["adapter"] = shutil.copytree(src, work / "tiny_adapter" / src.parent.name / "adapter")
            spec["tiny"] = {k: str(v) for k, v in spec["tiny"].items()}
        elif has_bundled_tiny():
            from pqm_ext.bin.prepare_whisper_base import prepare_whisper_base
            from pqm_ext.bin.quantize import quantize_dir

            (work / "whisper.yaml").write_text(yaml.safe_dump(WHISPER_CONF))
            base = prepare_whisper_base(str(work / "whisper.yaml"), str(whisper_token_list(work)), str(work / "tiny"))
            (work / "nf4.yaml").write_text(yaml.safe_dump({"quant_conf": {"method": "nf4"}}))
            nf4 = quantize_dir(base, work / "nf4.yaml", work / "tiny_nf4")
            spec["tiny"] = {"fp": str(base), "nf4": str(nf4), "source": "bundled tiny.en (temp dir)"}
        else:
            # e.g. a GPU machine without the weights: the decoding length is forced, so the architecture
            # alone sets the time
            spec["tiny"] = {**random_whisper(work, "whisper_tiny", WHISPER_TINY_DIMS),
                            "source": "tiny.en dims, random weights (no full-precision tiny.en here)"}
    if "whisper_base" in models:
        spec["base"] = random_whisper(work, "whisper_base", WHISPER_BASE_DIMS)
    if "conformer" in models:
        tokens = ["<blank>", "<unk>"] + [f"\u2581t{i}" for i in range(4997)] + ["<sos/eos>"]
        (work / "bpe5000.txt").write_text("\n".join(tokens) + "\n")
        spec["conformer"] = {"config": str(ROOT / "egs/TEMPLATE/conf/conformer/model_ls100.yaml"),
                             "token_list": str(work / "bpe5000.txt")}
    return spec


# --------------------------------------------------------------------------- worker
def build(spec: Dict, model_name: str, quantised: bool, device: str, double_quant: bool = False):
    """(model, primer, eos, maxlenratio, lora_target_modules, adapter_dir); ``double_quant`` applies to the
    random-weight models (Whisper tiny.en is the demo's stage-5 model as it is)."""
    import torch

    from pqm_ext.quant import QuantConfig, quantize_model

    compute = "float16" if device == "cuda" else "float32"
    if model_name == "whisper_tiny" and "config" not in spec["tiny"]:
        from pqm_ext.asr.recognizer import Recognizer

        conf = dict(beam_size=1, ctc_weight=0.0, lm_weight=0.0, penalty=0.0, maxlenratio=0.15, nbest=1)
        rec = Recognizer(spec["tiny"]["nf4" if quantised else "fp"], conf, reuse_dequantized=False)
        from pqm_ext.asr.batch_decode import greedy_settings

        primer, eos, ratio = greedy_settings(rec.s2t)
        return rec.model, primer, eos, ratio, WHISPER_LORA, spec["tiny"].get("adapter")
    if model_name.startswith("whisper"):
        from whisper.tokenizer import get_tokenizer

        from pqm_ext.tasks.pqm_asr import PQMASRTask

        conf = spec["tiny" if model_name == "whisper_tiny" else "base"]
        args = PQMASRTask.get_parser().parse_args(["--config", conf["config"], "--token_list", conf["token_list"]])
        torch.manual_seed(0)
        model = PQMASRTask.build_model(args)
        tok = get_tokenizer(multilingual=False)
        primer, eos, targets = list(tok.sot_sequence_including_notimestamps), tok.eot, WHISPER_LORA
    else:
        from espnet2.tasks.asr import ASRTask

        args = ASRTask.get_parser().parse_args(["--config", spec["conformer"]["config"],
                                                "--token_list", spec["conformer"]["token_list"]])
        torch.manual_seed(0)
        model = ASRTask.build_model(args)
        primer, eos, targets = [model.sos], model.eos, CONFORMER_LORA
    if quantised:
        quantize_model(model, QuantConfig(method="nf4", compute_dtype=compute, double_quant=double_quant))
    return model.eval(), primer, eos, 0.0, targets, None


def add_lora(model, targets, adapter_dir: Optional[str], seed: int = 0) -> str:
    import torch

    from pqm_ext.lora import AdapterConfig, add_adapter, adapter_config_of, load_adapter
    from pqm_ext.lora.mixed import lora_layers

    if adapter_dir:
        cfg = adapter_config_of(adapter_dir)
        add_adapter(model, cfg)
        load_adapter(model, adapter_dir)
        return f"real adapter, rank {cfg.rank} ({Path(adapter_dir).parent.name})"
    cfg = AdapterConfig(rank=4, alpha=8.0, target_modules=targets)
    add_adapter(model, cfg)
    g = torch.Generator().manual_seed(seed)
    layers = lora_layers(model)
    with torch.no_grad():
        for _, layer in layers:
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.01)
    return f"random adapter, rank 4, {len(layers)} layers"


class Variant:
    """One (model, variant) ready to decode: the model built and set up, its contexts entered."""

    def __init__(self, job: Dict, variant: str):
        import torch

        from pqm_ext.lora.mixed import folded
        from pqm_ext.quant import set_dequant_cache

        spec, name, device = job["spec"], job["model"], job["device"]
        self.name, self.variant, self.device = name, variant, device
        cuda = device == "cuda"
        model, self.primer, self.eos, self.ratio, targets, adapter_dir = build(
            spec, name, variant != "fp", device, job.get("double_quant", False))
        if name == "conformer" and job.get("pointwise"):
            targets = targets + CONFORMER_POINTWISE
        self.note = add_lora(model, targets, adapter_dir) if variant.startswith("nf4_lora") else ""
        model.eval()
        if cuda:
            model.to("cuda")
            model.half()
            # ESPnet runs the feature extraction outside autocast (ESPnetASRModel.encode): keep it in float32
            for part in ("frontend", "normalize"):
                if getattr(model, part, None) is not None:
                    getattr(model, part).float()
        cache = variant not in ("nf4_plain", "nf4_incr")
        set_dequant_cache(model.decoder if variant == "nf4_fast_dec" else model, cache and variant != "fp",
                          dtype=torch.float16 if cuda else None)
        if hasattr(model.decoder, "incremental"):
            model.decoder.incremental = variant not in ("nf4_plain", "nf4_cache")
        self.stack = contextlib.ExitStack()
        if variant == "nf4_lora_fold":
            self.stack.enter_context(folded(model))
        if variant == "nf4_lora_compile":
            if hasattr(model.decoder, "_step"):
                model.decoder._step = torch.compile(model.decoder._step, dynamic=True)
            else:
                model.decoder.forward_one_step = torch.compile(model.decoder.forward_one_step, dynamic=True)
        if cuda:
            self.stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
        self.stack.enter_context(torch.no_grad())
        self.model, self.forced = model, job["steps"]

    def run(self, utts) -> Tuple[int, int]:
        """Decode one batch; (tokens, decoder steps)."""
        import torch

        from pqm_ext.asr.batch_decode import greedy_search, padded_length

        model = self.model
        width = padded_length(model, max(len(w) for w in utts)) or max(len(w) for w in utts)
        x = torch.zeros(len(utts), width)
        for i, w in enumerate(utts):
            x[i, : len(w)] = torch.from_numpy(w)
        n = torch.full((len(utts),), width, dtype=torch.long) if padded_length(model, 1) else \
            torch.tensor([len(w) for w in utts])
        x, n = x.to(self.device), n.to(self.device)
        ids, steps = greedy_search(model, x, n, primer=self.primer, eos=self.eos, maxlenratio=self.ratio,
                                   force_steps=self.forced)
        return sum(len(i) for i in ids), steps

    def warm_up(self, wavs) -> float:
        """Decode one utterance (fills the caches, and compiles); its seconds."""
        t0 = time.perf_counter()
        self.run(wavs[:1])
        return time.perf_counter() - t0

    def run_all(self, utts, batch: int) -> Tuple[float, int, int]:
        """Seconds, tokens and steps for ``utts`` in batches of ``batch``."""
        import torch

        cuda = self.device == "cuda"
        t0 = time.perf_counter()
        tokens = steps = 0
        for s in range(0, len(utts), batch):
            tk, st = self.run(utts[s: s + batch])
            tokens, steps = tokens + tk, steps + st
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, tokens, steps

    def row(self, batch: int, utts, seconds: float, tokens: int, steps: int, peak: int, peak_kind: str,
            warm_s: float, load) -> Dict:
        audio = sum(len(w) for w in utts) / 16000
        wb = weight_bytes(self.model)
        return {"model": self.name, "device": self.device, "variant": self.variant, "batch": batch,
                "utts": len(utts), "tokens": tokens, "steps": steps, "seconds": seconds, "audio_s": audio,
                "rtf": seconds / audio, "tok_s": tokens / seconds, "weights": wb["weights"], "cache": wb["cache"],
                "peak": peak, "peak_kind": peak_kind, "warmup_s": warm_s, "load": load, "note": self.note}


def start_worker(job: Dict):
    """Quiet logging, the thread count, and the utterances: what every worker process starts with."""
    import soundfile as sf
    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return [sf.read(p, dtype="float32")[0] for p in job["spec"]["wavs"]]


def batch_utts(wavs, job: Dict, batch: int):
    return wavs[: (job["n1"] if batch == 1 else batch)]


def worker(job: Dict) -> Dict:
    """One variant in its own process: its peak memory is its own."""
    import torch

    wavs = start_worker(job)
    cuda = job["device"] == "cuda"
    v = Variant(job, job["variant"])
    results = []
    with v.stack:
        warm_s = v.warm_up(wavs)
        for batch in job["batches"]:
            utts = batch_utts(wavs, job, batch)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            reset_peak_rss()
            load_before = load1()
            # the median of the repeats: short GPU runs are noisy
            runs = [v.run_all(utts, batch) for _ in range(job.get("repeats", 1))]
            seconds = sorted(r[0] for r in runs)[len(runs) // 2]
            peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
            results.append(v.row(batch, utts, seconds, runs[0][1], runs[0][2], peak,
                                 "cuda max allocated" if cuda else "peak RSS", warm_s, [load_before, load1()]))
    return {"results": results}


def interleaved_worker(job: Dict) -> Dict:
    """All variants of one model in one process, timed in rounds (one pass of each variant per round,
    the order rotated each round). Separate processes on a GPU differ by up to ~1.5x for the same
    variant (clocks, host scheduling); within a round they share those conditions, so the ratios
    compare like with like. Each variant's "x fp" is also reported as the median of its per-round
    ratios. Peak memory here is what a variant's pass adds on top of everything resident (GPU only)."""
    import torch

    wavs = start_worker(job)
    cuda = job["device"] == "cuda"
    variants, warm = [], {}
    with contextlib.ExitStack() as outer:
        for name in job["variants"]:
            v = Variant(job, name)
            outer.enter_context(v.stack)
            warm[name] = v.warm_up(wavs)
            variants.append(v)
        results = []
        for batch in job["batches"]:
            utts = batch_utts(wavs, job, batch)
            active = [v for v in variants if batch == 1 or v.variant not in ATTRIBUTION]
            times = {v.variant: [] for v in active}
            peaks = {v.variant: 0 for v in active}
            load_before = load1()
            counts = {}
            for r in range(job.get("repeats", 1)):
                k = r % len(active)
                for v in active[k:] + active[:k]:
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        resident = torch.cuda.memory_allocated()
                    sec, tk, st = v.run_all(utts, batch)
                    times[v.variant].append(sec)
                    counts[v.variant] = (tk, st)
                    if cuda:
                        peaks[v.variant] = max(peaks[v.variant], torch.cuda.max_memory_allocated() - resident)
            load = [load_before, load1()]
            for v in active:
                ts = times[v.variant]
                row = v.row(batch, utts, sorted(ts)[len(ts) // 2], *counts[v.variant], peaks[v.variant],
                            "cuda peak above resident" if cuda else "not measured (one process)", warm[v.variant],
                            load)
                if "fp" in times:
                    ratios = sorted(t / f for t, f in zip(ts, times["fp"]))
                    row["paired_x_fp"] = ratios[len(ratios) // 2]
                results.append(row)
    return {"results": results}


# --------------------------------------------------------------------------- fast == plain on the demo
def identity_on_demo(beam: int, limit: int = 0, model: str = "whisper", data: Optional[str] = None) -> str:
    """Demo test set through Speech2Text (the recipe's decoding config, with ``beam``): the fast path as
    stage 8 runs it (dequantisation cache, Whisper's incremental decoder, each speaker's adapter folded
    into the weights) vs the plain path (weights dequantised on every call, ESPnet's full recomputation,
    peft's unmerged LoRA), for NF4 and for NF4 + each speaker's own stage-7 adapter. ``data``: the test
    data dir (default: the demo's dump/raw/sa_test). Returns a summary line."""

    from pqm_ext.data.kaldi_dir import read_data_dir

    exp, test = DEMO / "exp" / model, Path(data) if data else DEMO_TEST
    if not data and model == "conformer" and (DEMO / "dump_3h" / "raw" / "sa_test").is_dir():
        test = DEMO / "dump_3h" / "raw" / "sa_test"  # the demo's Conformer ran on its 3 h pool's dumps
    if not (test / "wav.scp").is_file() or not (exp / "nf4" / "model.safetensors").is_file():
        return f"fast == plain on the demo: skipped (no demo experiment {exp} / {test})"
    conf = yaml.safe_load((DEMO / "conf" / model / "decode.yaml").read_text())
    conf["beam_size"] = beam
    data_dir = read_data_dir(test)
    spk2utt = data_dir.spk2utt()
    adapters = None
    for setting in ("pretrained/n20", "scratch/n20", "pretrained/n10", "scratch/n10", "pretrained/n5", "scratch/n5"):
        dirs = {s: exp / "adapt" / setting / s / "adapter" for s in spk2utt}
        if all((d / "adapter_model.safetensors").is_file() for d in dirs.values()):
            adapters = (setting, dirs)
            break
    out = []
    systems = [("nf4", None)] + ([(f"nf4+{adapters[0]}", adapters[1])] if adapters else [])
    with contextlib.chdir(DEMO):  # the recipe's configs name files relative to it (the Conformer's bpe.model)
        for label, dirs in systems:
            out.append(_fast_vs_plain(label, dirs, exp, conf, data_dir, spk2utt, limit))
    where = test.relative_to(DEMO) if test.is_relative_to(DEMO) else test
    return f"fast == plain on the demo test set ({model}, {where}), Speech2Text beam {beam}: " + "; ".join(out)


def _fast_vs_plain(label: str, dirs, exp: Path, conf: Dict, data_dir, spk2utt, limit: int) -> str:
    """One system (``dirs``: each speaker's adapter, or None) decoded by both paths; a summary."""
    from pqm_ext.asr.recognizer import Recognizer
    from pqm_ext.data.audio import read_audio
    from pqm_ext.lora import adapter_config_of
    from pqm_ext.quant import set_dequant_cache

    rec = Recognizer(exp / "nf4", conf, adapter=adapter_config_of(next(iter(dirs.values()))) if dirs else None)
    incremental = hasattr(rec.model.decoder, "incremental")  # Whisper's; the Conformer's decoder has its cache
    seconds, hyps = {}, {}
    for path, fast in (("fast", True), ("plain", False)):
        set_dequant_cache(rec.model, fast)
        if incremental:
            rec.model.decoder.incremental = fast
        t0 = time.perf_counter()
        for spk, utts in spk2utt.items():
            with rec.speaker(dirs[spk] if dirs else None, fold=fast):
                for utt in utts[: limit or None]:
                    wav = read_audio(data_dir.wav_scp[utt])[0]
                    rec.s2t.maxlenratio = rec.maxlenratio(len(wav))  # the recipe's per-utterance guard
                    best = rec.s2t(wav)[0]
                    hyps[path, utt] = (best[0], best[3].yseq.tolist())
        seconds[path] = time.perf_counter() - t0
    utts = [u for path, u in hyps if path == "fast"]
    same = sum(hyps["fast", u] == hyps["plain", u] for u in utts)
    return f"{label}: {same}/{len(utts)} identical (fast {seconds['fast']:.0f} s, plain {seconds['plain']:.0f} s)"


# --------------------------------------------------------------------------- main
def variant_label(variant: str, device: str) -> str:
    if variant == "fp":
        return "fp16" if device == "cuda" else "fp32"
    return variant


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "nf4_lora_compile"],
                   choices=VARIANTS)
    p.add_argument("--compile", action="store_true", help="also run nf4_lora_compile (torch.compile)")
    p.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--n1", type=int, default=4, help="utterances decoded one at a time for batch 1")
    p.add_argument("--steps", type=int, default=24, help="forced output length (random-weight models)")
    p.add_argument("--repeats", type=int, default=1, help="time each batch setting this often, report the median")
    p.add_argument("--double_quant", action="store_true",
                   help="NF4 with double quantisation (random-weight models): smaller weights, same speed")
    p.add_argument("--wait_load", type=float, default=0.7, help="wait until the 1-min load is below this")
    p.add_argument("--max_wait", type=float, default=2700.0)
    p.add_argument("--pointwise", action="store_true",
                   help="the Conformer's adapter also on its pointwise convolutions (conv_module.pointwise_conv1/2)")
    p.add_argument("--interleave", action="store_true",
                   help="time all variants of a model in one process, in rotating rounds (robust ratios on a "
                        "GPU; peak memory becomes each pass's peak above what is resident)")
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--identity", type=int, nargs="*", default=None, metavar="BEAM",
                   help="only check fast == plain hypotheses on the demo test set with these beams (default 1)")
    p.add_argument("--identity_limit", type=int, default=0, help="utterances per speaker (0: all)")
    p.add_argument("--identity_model", default="whisper", choices=["whisper", "conformer"])
    p.add_argument("--identity_data", default=None,
                   help="test data dir (default: the demo's dump/raw/sa_test; dump_3h for the Conformer if present)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        job = json.loads(Path(a.worker).read_text())
        print("RESULT " + json.dumps((interleaved_worker if job.get("interleave") else worker)(job)))
        return
    if a.identity is not None:
        logging.disable(logging.WARNING)
        for beam in a.identity or [1]:
            print(identity_on_demo(beam, a.identity_limit, a.identity_model, a.identity_data))
        return
    import torch

    devices = a.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    variants = list(a.variants) + (["nf4_lora_compile"] if a.compile and "nf4_lora_compile" not in a.variants else [])
    logging.disable(logging.WARNING)
    results: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="pqm-decode-speed-") as tmp:
        work = Path(tmp)
        spec = prepare(work, a.models, max(a.batches))
        spec["double_quant"] = a.double_quant
        note = wait_for_quiet(a.wait_load, a.max_wait)
        t_start = time.time()
        common = {"spec": spec, "n1": a.n1, "steps": a.steps, "double_quant": a.double_quant, "repeats": a.repeats,
                  "pointwise": a.pointwise}
        for device in devices:
            for model in a.models:
                if a.interleave:
                    job = {**common, "model": model, "device": device, "variants": variants, "interleave": True,
                           "batches": a.batches}
                    res = run_worker(__file__, job, work, f"{model} {device} interleaved")
                    results += res["results"] if res else []
                    continue
                for variant in variants:
                    batches = a.batches
                    if variant in ATTRIBUTION:
                        if not model.startswith("whisper") or 1 not in a.batches:
                            continue
                        batches = [1]
                    job = {**common, "model": model, "device": device, "variant": variant, "batches": batches}
                    res = run_worker(__file__, job, work, f"{model} {device} {variant}")
                    if res is None:
                        continue
                    rows = res["results"]
                    results += rows
                    print(f"# done {model} {device} {variant}: " + ", ".join(
                        f"batch {r['batch']} {r['tok_s']:.1f} tok/s" for r in rows), file=sys.stderr, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": cpu_name(), "note": note, "results": results}, indent=1))
    print_table(results, note, time.time() - t_start, spec)


def print_table(results: List[Dict], note: str, elapsed: float, spec: Dict) -> None:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# CPU: {cpu_name()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"GPU: {gpu}; torch {torch.__version__}")
    print(f"# utterances: {spec.get('speech_source')}; whisper_tiny: {spec.get('tiny', {}).get('source', '-')}; "
          f"NF4 of the random-weight models: blocksize 64, double quantisation {'on' if spec.get('double_quant') else 'off'}")
    print(f"# {note}")
    header = (f"{'model':13s} {'dev':4s} {'variant':16s} {'batch':>5s} {'utts':>4s} {'tokens':>6s} {'sec':>7s} "
              f"{'RTF':>7s} {'tok/s':>7s} {'x fp':>6s} {'weights MB':>10s} {'cache MB':>8s} {'peak MB':>8s} "
              f"{'warm s':>6s} {'pair x':>6s}")
    print(header)
    print("-" * len(header))
    fp = {(r["model"], r["device"], r["batch"]): r for r in results if r["variant"] == "fp"}
    summary = {}
    for r in results:
        ref = fp.get((r["model"], r["device"], r["batch"]))
        # time per token relative to full precision (forced-length models decode equal token counts)
        slow = (ref["tok_s"] / r["tok_s"]) if ref else float("nan")
        print(f"{r['model']:13s} {r['device']:4s} {variant_label(r['variant'], r['device']):16s} {r['batch']:5d} "
              f"{r['utts']:4d} {r['tokens']:6d} {r['seconds']:7.2f} {r['rtf']:7.4f} {r['tok_s']:7.1f} "
              f"{slow:5.2f}x {r['weights'] / MB:10.1f} {r['cache'] / MB:8.1f} {r['peak'] / MB:8.0f} "
              f"{r['warmup_s']:6.1f} " + (f"{r['paired_x_fp']:5.2f}x" if "paired_x_fp" in r else f"{'-':>6s}"))
        if r["variant"] in ("nf4_lora", "nf4_lora_fold") and ref:
            key = f"{r['model']}_{r['device']}_b{r['batch']}"
            summary[f"{key}_{r['variant'].replace('_', '')}_vs_fp"] = r.get("paired_x_fp", slow)
            summary[key + "_weights_vs_fp"] = r["weights"] / ref["weights"]
    notes = sorted({r["note"] for r in results if r["note"]})
    loads = [x for r in results for x in r["load"]]
    print(f"(peak: {results[0]['peak_kind'] if results else '-'}; 'x fp' = seconds per token / full precision's; "
          f"'pair x' (--interleave) = median over rounds of the round's time / full precision's in the same "
          f"round, used in the summary; "
          f"LoRA: {'; '.join(notes) or '-'}; 1-min load during runs {min(loads, default=0):.2f}-"
          f"{max(loads, default=0):.2f}; {elapsed:.0f} s)")
    print(" ".join(f"{k}={v:.2f}x" for k, v in summary.items()))


if __name__ == "__main__":
    main()

"""Serving many speakers on one NF4 base: a mixed batch (every utterance its own adapter) vs switching.

32 speakers, each with its own rank-4 LoRA adapter on the NF4 Whisper tiny.en base (the demo's stage-5
model, or the bundled tiny.en quantised in a temp dir). The adapters are random (peft's A, B drawn
with std 0.01, seeded): throughput does not depend on the values, and every speaker's adapter really
differs. One utterance per speaker (the demo test set's, at most 8 s each), greedy decoding with the
recipe's decoding config (length guard of 8 tokens per second of audio; natural lengths).

  switch_load       per speaker: load its adapter from disk (Recognizer.use_adapter), decode its
                    utterance (batch 1, incremental decoder + dequantisation cache), LoRA unmerged:
                    stage 8 with --fold_adapters false
  switch_preloaded  all adapters in memory, switch peft's active adapter, decode (batch 1)
  switch_fold       load, fold the adapter into the dequantised weights (Recognizer.speaker), decode
                    (batch 1): stage 8's way
  mixed_peft        one batch of 32 utterances, row i with speaker i's adapter, peft's mixed forward
  mixed_batched     the same with our batched LoRA (stacked A/B, gathered per row, two bmm per layer)
  one_adapter_b32   reference: a batch of 32 utterances all with one adapter (batching alone)
Texts must agree between switching and mixed batches ("same" column: utterances whose text equals
switch_load's). With --demo_identity (and a demo experiment with stage-7 adapters), the whole demo
test set is also decoded speaker by speaker (Speech2Text) and in mixed batches with the real adapters,
and the identical hypotheses are counted.

Usage:
    OMP_NUM_THREADS=1 python bench/multi_speaker.py                  # table; last line: ratios vs switch_load
    python bench/multi_speaker.py --speakers 8 --demo_identity
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_speed import (DEMO_EXP, DEMO_TEST, WHISPER_LORA, cpu_name, load1, peak_rss_bytes,  # noqa: E402
                          prepare, reset_peak_rss, wait_for_quiet)

# The recipe's decoding config (egs/TEMPLATE/conf/whisper/decode.yaml).
GREEDY = dict(beam_size=1, ctc_weight=0.0, lm_weight=0.0, penalty=0.0, max_tokens_per_second=8, minlenratio=0.0,
              nbest=1)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _autocast(device: str):
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else contextlib.nullcontext()


def make_adapters(nf4_dir: str, out: Path, n: int) -> Dict[str, Path]:
    import torch

    from pqm_ext.asr.recognizer import Recognizer
    from pqm_ext.lora import AdapterConfig, save_adapter
    from pqm_ext.lora.mixed import lora_layers

    cfg = AdapterConfig(rank=4, alpha=8.0, target_modules=WHISPER_LORA)
    rec = Recognizer(nf4_dir, GREEDY, adapter=cfg)
    dirs = {}
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for _, layer in lora_layers(rec.model):
                for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.01)
        dirs[f"spk{i:02d}"] = save_adapter(rec.model, out / f"spk{i:02d}", cfg, info={"speaker": f"spk{i:02d}"})
    return dirs


def run_modes(nf4_dir: str, dirs: Dict[str, Path], wavs: List, device: str, modes: List[str]) -> List[Dict]:
    import torch

    from pqm_ext.asr.batch_decode import batch_decode
    from pqm_ext.asr.recognizer import Recognizer
    from pqm_ext.lora import adapter_config_of
    from pqm_ext.lora.mixed import load_adapters
    from pqm_ext.quant import set_dequant_cache

    spks = list(dirs)
    cfg = adapter_config_of(dirs[spks[0]])
    audio = sum(len(w) for w in wavs) / 16000
    out = []

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, rec):
        batch_decode(rec, wavs[:1], batch_size=1)  # warm-up: fills the dequantisation caches
        sync()
        reset_peak_rss()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if device == "cuda" else rss_bytes()
        t0 = time.perf_counter()
        texts = fn()
        sync()
        sec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
        return texts, sec, peak - before

    for mode in modes:
        rec = Recognizer(nf4_dir, GREEDY, adapter=cfg, device=device)
        if device == "cuda":  # float16 activations and dequantised copies, as a GPU server would run
            rec.model.half()
            set_dequant_cache(rec.model, True, dtype=torch.float16)
        if mode == "switch_load":
            def fn():
                res = []
                for s, w in zip(spks, wavs):
                    rec.use_adapter(dirs[s])
                    res += batch_decode(rec, [w], batch_size=1)
                return res
        elif mode == "switch_fold":
            def fn():
                res = []
                for s, w in zip(spks, wavs):
                    with rec.speaker(dirs[s]):  # stage 8's per-speaker path: load and fold
                        res += batch_decode(rec, [w], batch_size=1)
                return res
        elif mode == "switch_preloaded":
            mixed = load_adapters(rec.model, dirs)

            def fn():
                res = []
                for s, w in zip(spks, wavs):
                    mixed.use(s)
                    res += batch_decode(rec, [w], batch_size=1)
                return res
        elif mode in ("mixed_peft", "mixed_batched"):
            mixed = load_adapters(rec.model, dirs, impl=mode.split("_")[1])
            mixed.stacks() if mixed.impl == "batched" else None

            def fn():
                return batch_decode(rec, wavs, adapter_names=spks, mixed=mixed, batch_size=len(wavs))
        elif mode == "one_adapter_b32":
            rec.use_adapter(dirs[spks[0]])

            def fn():
                return batch_decode(rec, wavs, batch_size=len(wavs))
        else:
            raise ValueError(mode)
        load_before = load1()
        with _autocast(device):
            texts, sec, peak = timed(fn, rec)
        out.append({"mode": mode, "texts": texts, "seconds": sec, "utts": len(wavs), "audio_s": audio,
                    "peak": peak, "load": [load_before, load1()]})
    return out


def demo_identity(nf4_dir: str) -> str:
    """Whole demo test set: per-speaker Speech2Text with each speaker's real adapter vs mixed batches."""
    from pqm_ext.asr.batch_decode import batch_decode
    from pqm_ext.asr.recognizer import Recognizer
    from pqm_ext.data.audio import read_audio
    from pqm_ext.data.kaldi_dir import read_data_dir
    from pqm_ext.lora import adapter_config_of
    from pqm_ext.lora.mixed import load_adapters

    data = read_data_dir(DEMO_TEST)
    spk2utt = data.spk2utt()
    for system in ("pretrained/n20", "scratch/n20", "pretrained/n10", "scratch/n10", "pretrained/n5", "scratch/n5"):
        dirs = {s: DEMO_EXP / "adapt" / system / s / "adapter" for s in spk2utt}
        if all((d / "adapter_model.safetensors").is_file() for d in dirs.values()):
            break
    else:
        return "demo identity: skipped (no adaptation setting has an adapter for every test speaker)"
    utts = [u for s in spk2utt for u in spk2utt[s]]
    wavs = {u: read_audio(data.wav_scp[u])[0] for u in utts}
    rec = Recognizer(nf4_dir, GREEDY, adapter=adapter_config_of(next(iter(dirs.values()))))
    t0 = time.perf_counter()
    ref = {}
    for s in spk2utt:
        rec.use_adapter(dirs[s])
        for u in spk2utt[s]:
            ref[u] = rec(wavs[u])
    t_ref = time.perf_counter() - t0
    rec2 = Recognizer(nf4_dir, GREEDY)
    mixed = load_adapters(rec2.model, dirs)
    order = sorted(utts, key=lambda u: (spk2utt[data.utt2spk[u]].index(u), data.utt2spk[u]))  # speakers interleaved
    t0 = time.perf_counter()
    hyps = batch_decode(rec2, [wavs[u] for u in order], adapter_names=[data.utt2spk[u] for u in order],
                        mixed=mixed, batch_size=32)
    t_mix = time.perf_counter() - t0
    same = sum(ref[u] == h for u, h in zip(order, hyps))
    return (f"demo identity ({system} adapters, {len(spk2utt)} speakers): {same}/{len(order)} hypotheses identical "
            f"between per-speaker Speech2Text greedy decoding ({t_ref:.1f} s) and mixed batches of 32 ({t_mix:.1f} s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speakers", type=int, default=32)
    p.add_argument("--modes", nargs="+", default=["switch_load", "switch_preloaded", "switch_fold", "mixed_peft",
                                                  "mixed_batched", "one_adapter_b32"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--demo_identity", action="store_true")
    p.add_argument("--wait_load", type=float, default=0.7)
    p.add_argument("--max_wait", type=float, default=2700.0)
    a = p.parse_args(argv)
    import soundfile as sf
    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="pqm-multi-speaker-") as tmp:
        work = Path(tmp)
        spec = prepare(work, ["whisper_tiny"], a.speakers, need_fp=False)
        nf4_dir = spec["tiny"]["nf4"]
        wavs = [sf.read(w, dtype="float32")[0] for w in spec["wavs"][: a.speakers]]
        dirs = make_adapters(nf4_dir, work / "adapters", a.speakers)
        identity = demo_identity(nf4_dir) if a.demo_identity else ""
        note = wait_for_quiet(a.wait_load, a.max_wait)
        t0 = time.time()
        rows = run_modes(nf4_dir, dirs, wavs, device, a.modes)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# CPU: {cpu_name()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"GPU: {gpu}; device {device}; torch {torch.__version__}")
    print(f"# NF4 Whisper tiny.en ({spec['tiny']['source']}); {a.speakers} speakers x 1 utterance "
          f"({spec['speech_source']}); random rank-4 adapters; greedy, <= 8 tokens/s")
    print(f"# {note}")
    if identity:
        print(f"# {identity}")
    header = f"{'mode':17s} {'utts':>4s} {'audio s':>7s} {'sec':>7s} {'utts/s':>7s} {'RTF':>7s} {'x switch':>8s} " \
             f"{'same':>5s} {'+peak MB':>8s}"
    print(header)
    print("-" * len(header))
    ref = next((r for r in rows if r["mode"] == "switch_load"), rows[0])
    summary = {}
    for r in rows:
        speedup = ref["seconds"] / r["seconds"]
        same = sum(x == y for x, y in zip(r["texts"], ref["texts"]))
        print(f"{r['mode']:17s} {r['utts']:4d} {r['audio_s']:7.1f} {r['seconds']:7.2f} {r['utts'] / r['seconds']:7.2f} "
              f"{r['seconds'] / r['audio_s']:7.4f} {speedup:7.2f}x {same:5d} {r['peak'] / 1e6:8.0f}")
        if r is not ref:
            summary[f"{r['mode']}_vs_{ref['mode']}"] = speedup
    loads = [x for r in rows for x in r["load"]]
    print(f"(+peak: {'cuda max allocated' if device == 'cuda' else 'peak RSS'} during the timed run minus the "
          f"memory held before it (model, adapters, filled caches); 'same': texts equal to switch_load's; "
          f"1-min load during runs "
          f"{min(loads):.2f}-{max(loads):.2f}; {time.time() - t0:.0f} s)")
    print(f"speakers={a.speakers} " + " ".join(f"{k}={v:.2f}x" for k, v in summary.items()))


if __name__ == "__main__":
    main()

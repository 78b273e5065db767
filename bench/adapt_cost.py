"""Adaptation cost: seconds and peak memory to train one speaker's adapter on 20 utterances.

Runs the real stage-7 code (``pqm_ext.asr.adapt.adapt_speaker`` -> ``train_adapter`` -> ESPnet's
trainer via PQMASRTask) on the NF4 Whisper tiny.en base, with the recipe's configs
(egs/TEMPLATE/conf/lora_trainer.yaml + conf/whisper/adapt_{scratch,pretrained}.yaml: rank 4 from
scratch / rank 1 from the pretrained LoRA, 3 epochs, batch 4, Adam). Data: the demo experiment
(egs/librispeech_sa: exp/whisper/nf4, lora_pretrain, dump/raw/sa_adapt, data/sa_splits) for its first
target speaker, read only (outputs go to a temp dir); without the demo, the bundled tiny.en quantised
in a temp dir and 20 flite sentences (scratch only: there is no pretrained LoRA).

Each (init, device) runs in its own process: peak RSS (VmHWM) on the CPU, torch.cuda.max_memory_allocated
on a GPU. The time covers everything the stage does for the unit (model build, base load, 3 epochs of
training and validation on 2 utterances, adapter export).

Usage:
    OMP_NUM_THREADS=1 python bench/adapt_cost.py                 # CPU (+ GPU if present)
    python bench/adapt_cost.py --inits scratch --device cuda
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_speed import (DEMO, DEMO_EXP, ROOT, SENTENCES, cpu_name, load1, peak_rss_bytes,  # noqa: E402
                          prepare, run_worker, synth_utterances, wait_for_quiet)

N_UTTS = 20
CONF = ROOT / "egs" / "TEMPLATE" / "conf"


def setup(work: Path) -> Dict:
    """An experiment root (links to the demo's read-only parts, or a temp build) and the data."""
    exp = work / "exp"
    exp.mkdir()
    from pqm_ext.data.kaldi_dir import DataDir, read_data_dir

    if (DEMO_EXP / "nf4" / "model.safetensors").is_file() and (DEMO / "dump/raw/sa_adapt/wav.scp").is_file():
        # copies of what the unit reads: the recipe may rewrite the demo while the benchmark runs
        shutil.copytree(DEMO_EXP / "nf4", exp / "nf4")
        inits = ["scratch"]
        if (DEMO_EXP / "lora_pretrain" / "adapter" / "adapter_model.safetensors").is_file():
            shutil.copytree(DEMO_EXP / "lora_pretrain" / "adapter", exp / "lora_pretrain" / "adapter")
            inits.append("pretrained")
        splits = work / "splits"
        splits.mkdir()
        spk = sorted(p.stem for p in (DEMO / "data" / "sa_splits").glob("*.adapt"))[0]
        order = (DEMO / "data" / "sa_splits" / f"{spk}.adapt").read_text().split()[:N_UTTS]
        (splits / f"{spk}.adapt").write_text("\n".join(order) + "\n")
        data = read_data_dir(DEMO / "dump/raw/sa_adapt").subset(order)
        (work / "wav").mkdir()
        data.wav_scp = {u: shutil.copy(p, work / "wav" / Path(p).name) for u, p in data.wav_scp.items()}
        (work / "sa_adapt").mkdir()
        data.write(work / "sa_adapt")
        return {"exp": str(exp), "data": str(work / "sa_adapt"), "splits": str(splits), "spk": spk,
                "inits": inits, "source": "demo exp (exp/whisper/nf4, lora_pretrain; dump/raw/sa_adapt)"}

    spec = prepare(work, ["whisper_tiny"], 1)
    (exp / "nf4").symlink_to(spec["tiny"]["nf4"])
    wavs = synth_utterances(work, N_UTTS)
    utts = [f"spk0-{i:03d}" for i in range(N_UTTS)]
    data = work / "sa_adapt"
    data.mkdir()
    import soundfile as sf

    DataDir(wav_scp=dict(zip(utts, wavs)), utt2spk={u: "spk0" for u in utts},
            text={u: SENTENCES[i % len(SENTENCES)].upper().strip(".") for i, u in enumerate(utts)},
            utt2num_samples={u: sf.info(w).frames for u, w in zip(utts, wavs)}).write(data)
    splits = work / "splits"
    splits.mkdir()
    (splits / "spk0.adapt").write_text("\n".join(utts) + "\n")
    return {"exp": str(exp), "data": str(data), "splits": str(splits), "spk": "spk0", "inits": ["scratch"],
            "source": "bundled tiny.en + 20 flite sentences (temp dir)"}


def worker(job: Dict) -> Dict:
    import torch

    from pqm_ext.asr.adapt import adapt_speaker
    from pqm_ext.asr.layout import ExpLayout
    from pqm_ext.data.kaldi_dir import read_data_dir

    logging.disable(logging.WARNING)
    init, device = job["init"], job["device"]
    layout = ExpLayout(Path(job["exp"]), quant="nf4")
    data = read_data_dir(job["data"])
    configs = {i: [str(CONF / "lora_trainer.yaml"), str(CONF / "whisper" / f"adapt_{i}.yaml")]
               for i in ("scratch", "pretrained")}
    order = (Path(job["splits"]) / f"{job['spk']}.adapt").read_text().split()[:N_UTTS]
    import soundfile as sf

    audio = sum(sf.info(data.wav_scp[u]).duration for u in order)
    load_before = load1()
    t0 = time.perf_counter()
    failures = adapt_speaker(layout, job["spk"], data, Path(job["splits"]), [N_UTTS], [init], configs,
                             ngpu=1 if device == "cuda" else 0)
    seconds = time.perf_counter() - t0
    if failures:
        raise RuntimeError("; ".join(failures))
    adapter = layout.adapt(init, N_UTTS, job["spk"]) / "adapter" / "adapter_model.safetensors"
    from pqm_ext.lora import adapter_config_of

    cfg = adapter_config_of(adapter.parent)
    import yaml

    epochs = yaml.safe_load(Path(configs[init][1]).read_text())["max_epoch"]
    return {"init": init, "device": device, "seconds": seconds, "epochs": epochs, "rank": cfg.rank,
            "audio_s": audio, "adapter_bytes": adapter.stat().st_size,
            "peak": torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes(),
            "load": [load_before, load1()]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inits", nargs="+", default=["scratch", "pretrained"])
    p.add_argument("--device", nargs="+", default=None)
    p.add_argument("--wait_load", type=float, default=0.7)
    p.add_argument("--max_wait", type=float, default=2700.0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(Path(a.worker).read_text()))))
        return
    import torch

    devices = a.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="pqm-adapt-cost-") as tmp:
        work = Path(tmp)
        spec = setup(work)
        note = wait_for_quiet(a.wait_load, a.max_wait)
        t_all = time.time()
        for device in devices:
            for init in [i for i in a.inits if i in spec["inits"]]:
                job = dict(spec, init=init, device=device, exp=str(work / f"exp_{device}_{init}"))
                exp = Path(job["exp"])
                exp.mkdir()
                for part in Path(spec["exp"]).iterdir():
                    (exp / part.name).symlink_to(part.resolve())
                res = run_worker(__file__, job, work, f"{init} {device}")
                if res is not None:
                    rows.append(res)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# CPU: {cpu_name()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"GPU: {gpu}; torch {torch.__version__}")
    print(f"# NF4 Whisper tiny.en, speaker {spec['spk']}, {N_UTTS} utterances; {spec['source']}")
    print(f"# {note}")
    header = (f"{'init':10s} {'dev':4s} {'rank':>4s} {'epochs':>6s} {'audio s':>7s} {'sec':>7s} {'s/epoch':>7s} "
              f"{'peak MB':>8s} {'adapter kB':>10s}")
    print(header)
    print("-" * len(header))
    summary = {}
    for r in rows:
        print(f"{r['init']:10s} {r['device']:4s} {r['rank']:4d} {r['epochs']:6d} {r['audio_s']:7.1f} "
              f"{r['seconds']:7.1f} {r['seconds'] / r['epochs']:7.1f} {r['peak'] / 1e6:8.0f} "
              f"{r['adapter_bytes'] / 1e3:10.1f}")
        summary[f"{r['init']}_{r['device']}_s"] = f"{r['seconds']:.1f}"
        summary[f"{r['init']}_{r['device']}_peak_MB"] = f"{r['peak'] / 1e6:.0f}"
    loads = [x for r in rows for x in r["load"]]
    print(f"(peak: {'cuda max allocated (GPU rows)' if 'cuda' in devices else 'peak RSS'}; 1-min load during runs "
          f"{min(loads, default=0):.2f}-{max(loads, default=0):.2f}; {time.time() - t_all:.0f} s)")
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()

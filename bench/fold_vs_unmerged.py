"""Stage 8's per-speaker loop with the adapter folded into the weights vs peft's unmerged LoRA.

What stage 8 runs (``Recognizer.speaker``, ESPnet's ``Speech2Text`` with the recipe's Whisper decoding
config, float32 on a GPU as stage 8 decodes there): the demo's stage-5 NF4 Whisper tiny.en with its
pretrained LoRA (stage 6) as the speaker's adapter, the first ``--utts`` demo test utterances, one
warm-up utterance, then 3 rounds of both modes in alternating order. Prints each round's seconds and one
summary line: the median folded / unmerged time and how many hypotheses are identical.

Usage:
    python bench/fold_vs_unmerged.py --device cuda --utts 32
    PQM_BENCH_DEMO=.gpu/demo python bench/fold_vs_unmerged.py --device cuda   # a copy of the demo
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_speed import DEMO_EXP, DEMO_TEST, ROOT  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--utts", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)

    import torch
    import yaml

    from pqm_ext.asr.recognizer import Recognizer
    from pqm_ext.data.audio import read_audio
    from pqm_ext.lora import adapter_config_of

    adapter = DEMO_EXP / "lora_pretrain" / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file() or not (DEMO_TEST / "wav.scp").is_file():
        sys.exit(f"needs the demo's Whisper experiment (stages 1-6): {adapter}, {DEMO_TEST}")
    logging.disable(logging.WARNING)
    conf = yaml.safe_load((ROOT / "egs/TEMPLATE/conf/whisper/decode.yaml").read_text())
    scp = dict(line.split(maxsplit=1) for line in (DEMO_TEST / "wav.scp").read_text().splitlines())
    wavs = [read_audio(scp[u])[0] for u in sorted(scp)[: a.utts]]
    rec = Recognizer(DEMO_EXP / "nf4", conf, device=a.device, adapter=adapter_config_of(adapter))
    cuda = a.device == "cuda"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# {name}; {len(wavs)} utterances, {sum(map(len, wavs)) / 16000:.1f} s of audio")
    with rec.speaker(adapter):
        rec(wavs[0])  # warm-up
    times, hyps = {False: [], True: []}, {}
    for r in range(a.rounds):
        for fold in ((False, True) if r % 2 == 0 else (True, False)):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with rec.speaker(adapter, fold=fold):
                hyps[fold] = [rec(w) for w in wavs]
            if cuda:
                torch.cuda.synchronize()
            times[fold].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    same = sum(x == y for x, y in zip(hyps[False], hyps[True]))
    for fold, label in ((False, "unmerged"), (True, "folded")):
        print(f"{label:9s} seconds per round: {' '.join(f'{t:.2f}' for t in times[fold])} (median {med[fold]:.2f})")
    print(f"stage8_{a.device}_folded_vs_unmerged={med[True] / med[False]:.2f}x identical={same}/{len(wavs)}")


if __name__ == "__main__":
    main()

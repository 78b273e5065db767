"""Compression of the paper's model sizes under NF4 (with and without double quantisation) and int4.

Models are built with random weights through ESPnet (sizes do not depend on the values):
  conformer     the Conformer AED of ESPnet's LibriSpeech-100 recipe (12 x 256-d Conformer blocks with
                macaron FFN, relative positions and a kernel-31 convolution module; 6 x 2048-unit
                Transformer decoder blocks; 5000 BPE units; conv2d subsampling; 80 mel bins)
  whisper_tiny  Whisper tiny.en dims, built by PQMASRTask with the PQM Whisper encoder/decoder
  whisper_base  Whisper base.en dims, likewise (vocabulary 51864, tied output projection)
Every Linear / Conv1d / Conv2d / Embedding is quantised (blocksize 64); other parameters are stored as
float16. Sizes come from ``size_report`` (parameters only); "file MB" is the saved checkpoint
(``save_quantized``), which also holds persistent buffers (e.g. Whisper's sinusoidal audio positions)
and the per-layer quantisation state.

Usage:
    OMP_NUM_THREADS=1 python bench/compression.py            # table, then one line of ratios vs fp32
    OMP_NUM_THREADS=1 python bench/compression.py --no_files # skip writing checkpoints
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

CONFORMER = {
    "frontend": "default",
    "frontend_conf": {"n_fft": 512, "hop_length": 160, "n_mels": 80},
    "normalize": "utterance_mvn",  # the recipe uses global_mvn (stats from data): no parameters either way
    "encoder": "conformer",
    "encoder_conf": {"output_size": 256, "attention_heads": 4, "linear_units": 1024, "num_blocks": 12,
                     "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
                     "input_layer": "conv2d", "normalize_before": True, "macaron_style": True,
                     "rel_pos_type": "latest", "pos_enc_layer_type": "rel_pos",
                     "selfattention_layer_type": "rel_selfattn", "activation_type": "swish",
                     "use_cnn_module": True, "cnn_module_kernel": 31},
    "decoder": "transformer",
    "decoder_conf": {"attention_heads": 4, "linear_units": 2048, "num_blocks": 6, "dropout_rate": 0.1},
    "model_conf": {"ctc_weight": 0.3, "lsm_weight": 0.1, "length_normalized_loss": False},
}
WHISPER_DIMS = {
    "tiny": dict(n_mels=80, n_vocab=51864, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                 n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4),
    "base": dict(n_mels=80, n_vocab=51864, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                 n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6),
}
# The recipe's Whisper model config (stage 4 fills in the dims from the checkpoint).
WHISPER = yaml.safe_load((Path(__file__).resolve().parents[1] / "egs/TEMPLATE/conf/whisper/model.yaml").read_text())


def build_conformer(work: Path) -> torch.nn.Module:
    from espnet2.tasks.asr import ASRTask

    tokens = ["<blank>", "<unk>"] + [f"▁t{i}" for i in range(4997)] + ["<sos/eos>"]  # 5000 units
    (work / "bpe5000.txt").write_text("\n".join(tokens) + "\n")
    (work / "conformer.yaml").write_text(yaml.safe_dump(CONFORMER))
    args = ASRTask.get_parser().parse_args(["--config", str(work / "conformer.yaml"),
                                            "--token_list", str(work / "bpe5000.txt")])
    torch.manual_seed(0)
    return ASRTask.build_model(args)


def build_whisper(work: Path, size: str) -> torch.nn.Module:
    from decode_speed import whisper_token_list  # bench/ is on sys.path when a bench script runs

    from pqm_ext.tasks.pqm_asr import PQMASRTask

    token_list = whisper_token_list(work)
    dims = {"dims": WHISPER_DIMS[size]}
    conf = {**WHISPER, "encoder_conf": {**WHISPER["encoder_conf"], **dims},
            "decoder_conf": {**WHISPER["decoder_conf"], **dims}}
    (work / f"whisper_{size}.yaml").write_text(yaml.safe_dump(conf))
    args = PQMASRTask.get_parser().parse_args(["--config", str(work / f"whisper_{size}.yaml"),
                                               "--token_list", str(token_list)])
    torch.manual_seed(0)
    return PQMASRTask.build_model(args)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no_files", action="store_true", help="do not write checkpoints (no 'file MB' column)")
    a = p.parse_args(argv)
    logging.disable(logging.INFO)
    torch.set_num_threads(1)

    from pqm_ext.quant import QuantConfig, quantize_model, save_quantized, size_report

    methods = {"nf4": QuantConfig(method="nf4"), "nf4_dq": QuantConfig(method="nf4", double_quant=True),
               "int4": QuantConfig(method="int", bits=4)}
    t0 = time.perf_counter()
    mb = 1e6
    header = (f"{'model':13s} {'params':>8s} {'method':7s} {'quant %':>7s} {'fp32 MB':>8s} {'fp16 MB':>8s} "
              f"{'MB':>7s} {'file MB':>8s} {'x fp32':>7s} {'x fp16':>7s}")
    print(header)
    print("-" * len(header))
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="pqm-bench-") as tmp:
        work = Path(tmp)
        builders = {"conformer": lambda: build_conformer(work),
                    "whisper_tiny": lambda: build_whisper(work, "tiny"),
                    "whisper_base": lambda: build_whisper(work, "base")}
        for model_name, build in builders.items():
            fp = build().eval()
            r = size_report(fp, storage_dtype="float32")
            print(f"{model_name:13s} {r.total_params / 1e6:7.2f}M {'fp32':7s} {'':>7s} {r.fp32_bytes / mb:8.2f} "
                  f"{2 * r.total_params / mb:8.2f} {r.bytes / mb:7.2f} {'':>8s} "
                  f"{r.ratio_fp32:6.2f}x {r.ratio_fp16:6.2f}x")
            for method, cfg in methods.items():
                model = copy.deepcopy(fp)
                quantize_model(model, cfg)
                r = size_report(model, storage_dtype=cfg.storage_dtype)
                file_mb = ""
                if not a.no_files:
                    path = work / f"{model_name}_{method}.safetensors"
                    save_quantized(model, path, cfg)
                    file_mb = f"{path.stat().st_size / mb:8.2f}"
                    path.unlink()
                print(f"{'':13s} {'':>8s} {method:7s} {100 * r.quantized_params / r.total_params:6.2f}% "
                      f"{r.fp32_bytes / mb:8.2f} {2 * r.total_params / mb:8.2f} {r.bytes / mb:7.2f} {file_mb:>8s} "
                      f"{r.ratio_fp32:6.2f}x {r.ratio_fp16:6.2f}x")
                ratios[f"{model_name}_{method}"] = r.ratio_fp32
                del model
            del fp
    print(f"(CPU, {time.perf_counter() - t0:.0f} s; sizes count parameters, unquantised ones as float16)")
    print(" ".join(f"{k}={v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()

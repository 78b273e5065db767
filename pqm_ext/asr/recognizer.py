"""ESPnet ``Speech2Text`` on a PQM system: a (quantised) base plus per-speaker LoRA adapters.

``Speech2Text`` builds models through ``ASRTask`` only, so it is built from the base's
``config.yaml`` without weights; the base file (full precision or quantised, loaded without
re-quantising) and the adapters are then put into that same model object in place, which the
beam search already scores with. Switching speakers reloads only the adapter weights, and
``speaker()`` folds the adapter into the dequantised weights while that speaker is decoded: peft's
unmerged LoRA adds small kernels to every layer at every decoder step (1.6-2.1x of fp16 on a GPU,
docs/PERFORMANCE.md), one dense weight per layer does not.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import re
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from pqm_ext.asr.config import read_yaml
from pqm_ext.asr.model_io import MODEL_FILE, bundled_bpemodel, load_base
from pqm_ext.lora import AdapterConfig, add_adapter, load_adapter
from pqm_ext.lora.mixed import folded
from pqm_ext.models.whisper import register_espnet_classes
from pqm_ext.quant import QuantConfig, set_dequant_cache
from pqm_ext.utils.errors import InputError

logger = logging.getLogger(__name__)


OWN_OPTIONS = ("max_tokens_per_second",)
SET_BY_RECOGNIZER = ("asr_train_config", "asr_model_file", "device")


def read_decode_config(path) -> Dict:
    """The decoding config at ``path``, its keys checked against Speech2Text's options first: a typo was a
    bare TypeError in every decoding job, naming no file."""
    from espnet2.bin.asr_inference import Speech2Text

    conf = read_yaml(path)
    known = set(inspect.signature(Speech2Text.__init__).parameters) - {"self"} - set(SET_BY_RECOGNIZER)
    unknown = [str(k) for k in conf if k not in known and k not in OWN_OPTIONS]
    if unknown:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        line = next((i for i, x in enumerate(lines, 1) if re.match(rf"\s*{re.escape(unknown[0])}\s*:", x)), None)
        raise InputError(path, f"{unknown[0]!r} is not an option of ESPnet's Speech2Text (nor "
                               f"{', '.join(OWN_OPTIONS)}); unknown: {', '.join(unknown)}", line=line)
    return conf


def decode_config_problem(path) -> Optional[str]:
    """What :func:`read_decode_config` would refuse in ``path`` (None: nothing); pqm.sh asks before any job."""
    try:
        read_decode_config(path)
    except InputError as e:
        return str(e)
    return None


class Recognizer:
    """Decode with ESPnet's beam search.

    ``decode_conf`` holds Speech2Text's options plus, optionally, ``max_tokens_per_second``: a
    length guard against Whisper's repetition loops relative to the *unpadded* audio (ESPnet's
    ``maxlenratio`` counts encoder frames, which include the padding Whisper's encoder adds).
    """

    def __init__(self, model_dir, decode_conf: Dict, device: str = "cpu",
                 adapter: Optional[AdapterConfig] = None, reuse_dequantized: bool = True):
        from espnet2.bin.asr_inference import Speech2Text

        register_espnet_classes()
        model_dir = Path(model_dir)
        decode_conf = dict(decode_conf)
        self.max_tokens_per_second = decode_conf.pop("max_tokens_per_second", None)
        bpemodel = bundled_bpemodel(model_dir)
        if bpemodel:  # not the config's path, relative to the recipe that trained the model
            decode_conf.setdefault("bpemodel", bpemodel)
        self.s2t = Speech2Text(asr_train_config=str(model_dir / "config.yaml"), asr_model_file=None,
                               device="cpu", **decode_conf)
        self.model = self.s2t.asr_model
        self.fingerprint = load_base(self.model, model_dir / MODEL_FILE, QuantConfig(method="none"))
        self.adapter = adapter
        if adapter is not None:
            add_adapter(self.model, adapter)
        self.model.eval()
        set_dequant_cache(self.model, reuse_dequantized)
        if device != "cpu":
            self.model.to(device)
            self.s2t.beam_search.to(device)
            self.s2t.device = device
        self.adapter_dir: Optional[str] = None
        self._fps: Optional[float] = None

    def use_adapter(self, adapter_dir) -> Dict:
        """Load a speaker's adapter (it must have been trained on this base)."""
        if self.adapter is None:
            raise ValueError("this recognizer was built without an adapter config")
        info = load_adapter(self.model, adapter_dir)
        self.adapter_dir = str(adapter_dir)
        return info

    @contextlib.contextmanager
    def speaker(self, adapter_dir=None, fold: bool = True):
        """Decode as one speaker inside the block: ``adapter_dir`` loaded (None: nothing loaded, so the base
        alone for a recognizer built without an adapter, else the adapter loaded last) and,
        with ``fold``, merged into each adapted layer's weight (``W + B A s``, one dense copy in place of
        the layer's dequantisation cache) until the block ends."""
        if adapter_dir is not None:
            self.use_adapter(adapter_dir)
        with folded(self.model) if fold and adapter_dir is not None else contextlib.nullcontext():
            yield self

    def _encoder_frames(self, seconds: float) -> float:
        encoder = self.model.encoder
        if getattr(encoder, "do_pad_trim", False):
            return 1500.0
        if hasattr(encoder, "pad_to_seconds"):  # Whisper's: 50 frames a second of its (padded) input
            return max(seconds, encoder.pad_to_seconds) * 50
        return seconds * self._frames_per_second()

    def _frames_per_second(self) -> float:
        """Encoder frames per second of audio, measured once on 10 s of silence: another encoder's rate is its
        frontend's hop and its subsampling (a Conformer with conv2d: 100 / 4 = 25), not Whisper's 50."""
        if self._fps is None:
            device = next(self.model.parameters()).device
            with torch.no_grad():
                _, lengths = self.model.encode(torch.zeros(1, 160000, device=device),
                                               torch.tensor([160000], device=device))
            self._fps = float(lengths[0]) / 10
        return self._fps

    def maxlenratio(self, n_samples: int, sample_rate: int = 16000) -> float:
        """ESPnet's ``maxlenratio`` for an utterance of ``n_samples``: ``max_tokens_per_second`` of its
        unpadded audio when set, else the decoding config's own."""
        if not self.max_tokens_per_second:
            return float(self.s2t.maxlenratio)
        seconds = n_samples / sample_rate
        return self.max_tokens_per_second * seconds / self._encoder_frames(seconds)

    @torch.no_grad()
    def __call__(self, speech: np.ndarray, sample_rate: int = 16000) -> str:
        self.s2t.maxlenratio = self.maxlenratio(len(speech), sample_rate)
        results = self.s2t(speech)
        return results[0][0] if results else ""

"""ESPnet's Whisper encoder and decoder, built from model dimensions instead of a hub download.

ESPnet's ``OpenAIWhisperEncoder``/``OpenAIWhisperDecoder`` call ``whisper.load_model(name)`` in their
constructor, which downloads official checkpoints and rejects local files. These subclasses keep
ESPnet's forward passes and scoring (so training and ``Speech2Text`` decoding are ESPnet's) but
build the network from ``dims`` (openai-whisper's ``ModelDimensions``); the weights are loaded
afterwards, from a local openai-whisper checkpoint (``load_whisper_checkpoint``) or from a model
file saved by this toolkit. The class names contain "Whisper", which ESPnetASRModel checks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from typeguard import typechecked

from espnet2.asr.decoder.abs_decoder import AbsDecoder
from espnet2.asr.decoder.whisper_decoder import OpenAIWhisperDecoder
from espnet2.asr.encoder.abs_encoder import AbsEncoder
from espnet2.asr.encoder.whisper_encoder import OpenAIWhisperEncoder
from espnet2.asr.specaug.specaug import SpecAug
from pqm_ext.utils.errors import InputError

logger = logging.getLogger(__name__)


def _dims(dims: Dict):
    from whisper.model import ModelDimensions

    return ModelDimensions(**dims)


class PQMWhisperEncoder(OpenAIWhisperEncoder):
    """Whisper's audio encoder (log-mel front end included) with ESPnet's interface."""

    @typechecked
    def __init__(self, input_size: int = 1, dims: Optional[Dict] = None, dropout_rate: float = 0.0,
                 use_specaug: bool = False, specaug_conf: Optional[Dict] = None, do_pad_trim: bool = False,
                 pad_to_seconds: float = 0.0):
        from whisper.audio import HOP_LENGTH, N_FFT, N_SAMPLES, mel_filters
        from whisper.model import AudioEncoder

        if dims is None:
            raise ValueError("encoder_conf.dims is required (see pqm_ext.bin.prepare_whisper_base)")
        AbsEncoder.__init__(self)
        d = _dims(dims)
        self.n_fft = self.win_length = N_FFT
        self.hop_length, self.n_mels = HOP_LENGTH, d.n_mels
        self.mel_filters = mel_filters
        self.dropout = torch.nn.Dropout(dropout_rate)
        self.encoders = AudioEncoder(d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer)
        self.specaug = SpecAug(**specaug_conf) if use_specaug else None
        self.do_pad_trim, self.pad_samples = do_pad_trim, N_SAMPLES
        self.pad_to_seconds = pad_to_seconds

    def forward(self, xs_pad: torch.Tensor, ilens: torch.Tensor, prev_states: torch.Tensor = None):
        """ESPnet's forward on utterances zero-padded to at least ``pad_to_seconds``.

        Whisper only ever saw windows of speech followed by silence (30 s, zero-padded) and
        predicts end-of-text from that silence; unpadded short utterances make it loop. Padding to
        a shorter fixed window keeps the cue at a fraction of the cost of 30 s (``do_pad_trim``).
        """
        too_long = int((ilens > self.pad_samples).sum())
        if too_long:  # ESPnet's whisper_encode keeps the first 30 s; the transcript keeps every word
            logger.warning("%d utterance(s) longer than Whisper's 30 s window: the encoder hears only their "
                           "first 30 s (longest %.1f s)", too_long, float(ilens.max()) / 16000)
        if self.pad_to_seconds > 0 and not self.do_pad_trim:
            target = int(self.pad_to_seconds * 16000)
            if xs_pad.size(1) < target:
                xs_pad = torch.nn.functional.pad(xs_pad, (0, target - xs_pad.size(1)))
            ilens = torch.full_like(ilens, xs_pad.size(1))
        return super().forward(xs_pad, ilens, prev_states)


class PQMWhisperDecoder(OpenAIWhisperDecoder):
    """Whisper's text decoder; its output projection is tied to the token embedding.

    ``incremental`` (default True) selects the incremental ``batch_score`` below; False gives
    ESPnet's full recomputation of every prefix (the reference "plain path" for tests and benches).
    """

    incremental: bool = True

    @typechecked
    def __init__(self, vocab_size: int, encoder_output_size: int, dims: Optional[Dict] = None,
                 dropout_rate: float = 0.0):
        from whisper.model import TextDecoder

        if dims is None:
            raise ValueError("decoder_conf.dims is required (see pqm_ext.bin.prepare_whisper_base)")
        AbsDecoder.__init__(self)
        d = _dims(dims)
        if vocab_size != d.n_vocab:
            raise ValueError(f"token list has {vocab_size} entries but the Whisper model has {d.n_vocab}")
        self.decoders = TextDecoder(d.n_vocab, d.n_text_ctx, d.n_text_state, d.n_text_head, d.n_text_layer)
        torch.nn.init.normal_(self.decoders.positional_embedding, std=0.01)
        self.dropout = torch.nn.Dropout(dropout_rate)
        self.load_origin_token_embedding = False
        self._cross_kv_source: Optional[torch.Tensor] = None
        self._cross_kv_view: Tuple = ()
        self._cross_kv: Dict = {}

    def _cross_attention_cache(self, memory: torch.Tensor) -> Dict:
        """Cross-attention keys/values of ``memory``, computed once per utterance.

        ESPnet's Whisper decoder recomputes them for every hypothesis at every step, which made
        them most of the decoding time. Beam search passes ``encoder_out.expand(n_hyps, ...)``
        views, so one utterance is recognised by the tensor the views share and where in it the
        view starts (utterances sliced from one batched encoder output share the tensor); the
        cached values are computed on one copy and expanded to the number of hypotheses. Rows of
        different utterances (a batch that is not an ``expand``) get their own keys/values.
        """
        source = memory._base if memory._base is not None else memory
        shared = memory.size(0) == 1 or memory.stride(0) == 0
        view = (memory.storage_offset(), tuple(memory.shape[1:]), memory.stride()[1:])
        if not shared:
            view += (memory.size(0), memory.stride(0))
        if source is not self._cross_kv_source or view != self._cross_kv_view:
            rows = memory[:1] if shared else memory
            self._cross_kv = {}
            for block in self.decoders.blocks:
                attn = block.cross_attn
                self._cross_kv[attn.key] = attn.key(rows)
                self._cross_kv[attn.value] = attn.value(rows)
            self._cross_kv_source, self._cross_kv_view = source, view
        n = memory.size(0)
        return {m: kv.expand(n, *kv.shape[1:]) for m, kv in self._cross_kv.items()}

    def batch_score(self, ys: torch.Tensor, states: List[Any], xs: torch.Tensor) -> Tuple[torch.Tensor, List[Any]]:
        """Next-token log-probabilities for a batch of hypotheses, incrementally.

        ESPnet's Whisper decoder re-runs every prefix in full at each step. Here each hypothesis'
        state holds its self-attention keys/values per layer, so a step runs only the new token;
        beam search reorders the states with the hypotheses (``select_state``). Training and
        gradient-enabled calls use ESPnet's path unchanged.
        """
        if self.training or torch.is_grad_enabled() or not self.incremental:
            return super().batch_score(ys, states, xs)
        cache = None
        if states[0] is not None:
            cache = [(torch.stack([s[i][0] for s in states]), torch.stack([s[i][1] for s in states]))
                     for i in range(len(self.decoders.blocks))]
        logp, new_cache = self._step(ys, xs, cache)
        return logp, [[(k[b], v[b]) for k, v in new_cache] for b in range(ys.size(0))]

    def _step(self, ys: torch.Tensor, memory: torch.Tensor, cache, cross: Optional[Dict] = None):
        """One incremental step; ``cross`` (module -> keys/values, one row per ``ys`` row) may be given
        by a caller that manages it itself (batched decoding drops finished rows)."""
        offset = 0 if cache is None else cache[0][0].size(1)
        tokens = ys[:, offset:]
        x = self.decoders.token_embedding(tokens) + self.decoders.positional_embedding[offset: ys.size(1)]
        x = x.to(memory.dtype)
        if cross is None:
            cross = self._cross_attention_cache(memory)
        mask = self.decoders.mask if offset == 0 else None  # one new token attends to every key
        new_cache = []
        for i, block in enumerate(self.decoders.blocks):
            h = block.attn_ln(x)
            k, v = block.attn.key(h), block.attn.value(h)
            if cache is not None:
                k, v = torch.cat([cache[i][0], k], dim=1), torch.cat([cache[i][1], v], dim=1)
            new_cache.append((k, v))
            x = x + block.attn.out(block.attn.qkv_attention(block.attn.query(h), k, v, mask)[0])
            x = x + block.cross_attn(block.cross_attn_ln(x), memory, kv_cache=cross)[0]
            x = x + block.mlp(block.mlp_ln(x))
        y = self.decoders.ln(x)[:, -1]
        # (vocab x d) @ (d x hyps): 2-5x faster on the CPU than hyps x d @ d x vocab for 2-8 hypotheses.
        y = (self.decoders.token_embedding.weight.to(y.dtype) @ y.t()).t().float()
        return torch.log_softmax(y, dim=-1), new_cache

    def train(self, mode: bool = True):
        self._cross_kv_source, self._cross_kv = None, {}
        return super().train(mode)


def read_whisper_checkpoint(path) -> Dict:
    """Read an openai-whisper checkpoint (``{"dims", "model_state_dict"}``) safely."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "Whisper checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt/pickled files
        raise InputError(path, f"cannot read as an openai-whisper checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise InputError(path, "not an openai-whisper checkpoint (expected keys 'dims' and 'model_state_dict')")
    return ckpt


def load_whisper_checkpoint(model: torch.nn.Module, ckpt: Dict) -> None:
    """Copy openai-whisper weights into an ESPnet model built with the PQM Whisper encoder/decoder."""
    sd = ckpt["model_state_dict"]
    enc = {k[len("encoder."):]: v.float() for k, v in sd.items() if k.startswith("encoder.")}
    dec = {k[len("decoder."):]: v.float() for k, v in sd.items() if k.startswith("decoder.")}
    model.encoder.encoders.load_state_dict(enc, strict=True)
    model.decoder.decoders.load_state_dict(dec, strict=True)


def register_espnet_classes() -> None:
    """Make ``encoder: pqm_whisper`` / ``decoder: pqm_whisper`` valid choices of ESPnet's ASR task.

    ESPnet's ``ASRTask.build_model`` looks classes up in module-level ``ClassChoices``; adding ours
    there (idempotent, called explicitly by ``PQMASRTask`` and the decoders) extends ESPnet
    without forking it.
    """
    from espnet2.tasks import asr

    asr.encoder_choices.classes.setdefault("pqm_whisper", PQMWhisperEncoder)
    asr.decoder_choices.classes.setdefault("pqm_whisper", PQMWhisperDecoder)

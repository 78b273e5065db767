"""Batched greedy decoding: many utterances (and, with mixed adapters, many speakers) per forward.

ESPnet's ``Speech2Text`` decodes one utterance at a time. Here a batch is encoded once and every
decoder step runs all of its rows together: the Whisper decoder's incremental ``_step`` (per-row
self-attention keys/values, cross-attention keys/values computed once per batch) or ESPnet's
``forward_one_step`` for its Transformer decoder. Rows stop at end-of-text or at ESPnet's length
guard (``maxlenratio``: > 0 caps the output at ``int(maxlenratio * encoder frames)`` tokens, < 0 at
a constant, 0 at the number of encoder frames; a ``Recognizer`` with ``max_tokens_per_second`` sets
it per utterance, as its own decoding does); finished rows leave the batch. Token ids become
text exactly as ``Speech2Text`` does it (its converter and tokenizer), so for a greedy decoding
configuration (beam 1, decoder score only) the texts are those of ``Speech2Text``, one utterance
at a time (tested).

Whisper encoders see each utterance padded with zeros to ``pad_to_seconds`` (or 30 s with
``do_pad_trim``) and attend over the whole window, so batching longer utterances with shorter ones
would change what the shorter ones' encoder sees: utterances are grouped by that padded length and
a batch holds one group only. ESPnet's Transformer/Conformer models are batched with padding and
masks as in training (not bit-identical to one-at-a-time decoding: convolution modules see the
padding).

``adapter_names`` (one per utterance, with ``pqm_ext.lora.mixed.MixedAdapters`` loaded into the
model) decodes every utterance with its own speaker's adapter inside one batch.

Usage:
    from pqm_ext.asr.batch_decode import batch_decode
    from pqm_ext.asr.recognizer import Recognizer
    from pqm_ext.lora.mixed import load_adapters
    rec = Recognizer("exp/whisper/nf4", {"beam_size": 1, "ctc_weight": 0.0, "max_tokens_per_second": 8})
    mixed = load_adapters(rec.model, {"1937": "exp/whisper/adapt/pretrained/n20/1937/adapter", ...})
    texts = batch_decode(rec, [wav1, wav2, ...], adapter_names=["1937", "195", ...], mixed=mixed)
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)
Speech = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------- the search
def _is_whisper_decoder(decoder) -> bool:
    from espnet2.asr.decoder.whisper_decoder import OpenAIWhisperDecoder

    return isinstance(decoder, OpenAIWhisperDecoder)


def max_output_length(maxlenratio: float, enc_frames: int) -> int:
    """ESPnet's ``BeamSearch.forward`` length bound for an encoder output of ``enc_frames`` frames."""
    if maxlenratio == 0:
        return enc_frames
    if maxlenratio < 0:
        return -1 * int(maxlenratio)
    return max(1, int(maxlenratio * enc_frames))


class _Stepper:
    """Runs decoder steps for a batch of rows and can drop rows (finished utterances)."""

    def __init__(self, model, enc: torch.Tensor, enc_lens: torch.Tensor, incremental: bool):
        self.dec, self.enc, self.incremental = model.decoder, enc, incremental
        self.whisper = _is_whisper_decoder(self.dec)
        self.cache: Any = None
        self.cross: Optional[Dict] = None
        self.memory_mask = None
        if self.whisper:
            if incremental:
                if not hasattr(self.dec, "_step"):
                    raise TypeError(f"{type(self.dec).__name__} has no incremental step (use PQMWhisperDecoder)")
                self.cross = self.dec._cross_attention_cache(enc)
        elif not hasattr(self.dec, "forward_one_step"):
            raise TypeError(f"batched greedy decoding does not support {type(self.dec).__name__}")
        elif bool((enc_lens < enc.size(1)).any()):
            from espnet.nets.pytorch_backend.nets_utils import make_pad_mask

            self.memory_mask = (~make_pad_mask(enc_lens, maxlen=enc.size(1)))[:, None, :].to(enc.device)

    def __call__(self, ys: torch.Tensor) -> torch.Tensor:
        if self.whisper:
            if self.incremental:
                logp, self.cache = self.dec._step(ys, self.enc, self.cache, cross=self.cross)
                return logp
            from espnet2.asr.decoder.whisper_decoder import OpenAIWhisperDecoder

            return OpenAIWhisperDecoder.forward_one_step(self.dec, ys, torch.empty(0), self.enc)[0]
        from espnet.nets.pytorch_backend.transformer.mask import subsequent_mask

        mask = subsequent_mask(ys.size(-1), device=ys.device).unsqueeze(0)
        logp, cache = self.dec.forward_one_step(ys, mask, self.enc, self.memory_mask,
                                                cache=self.cache if self.incremental else None)
        if self.incremental:
            self.cache = cache
        return logp

    def select(self, keep: torch.Tensor) -> None:
        self.enc = self.enc[keep]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask[keep]
        if self.cross is not None:
            self.cross = {m: kv[keep] for m, kv in self.cross.items()}
        if self.cache is not None:
            if self.whisper:
                self.cache = [(k[keep], v[keep]) for k, v in self.cache]
            else:
                self.cache = [c[keep] for c in self.cache]


@torch.no_grad()
def greedy_search(model, speech: torch.Tensor, lengths: torch.Tensor, *, primer: Sequence[int], eos: int,
                  maxlenratio: Union[float, Sequence[float]] = 0.0, force_steps: Optional[int] = None,
                  incremental: bool = True, rows=None) -> Tuple[List[List[int]], int]:
    """Greedy decoding of one padded batch ``speech`` (rows, samples) with ``lengths``.

    ``maxlenratio``: ESPnet's length guard, one for all rows or one per row.
    Returns the generated token ids of each row (without end-of-text) and the number of decoder
    steps run. ``force_steps``: run exactly that many steps for every row, ignoring end-of-text and
    the length guard (benchmarks: equal lengths across models). ``incremental=False``: recompute
    every prefix in full (ESPnet's Whisper scoring; no Transformer-decoder cache) — the reference
    path. ``rows``: a ``RowAdapters`` from ``MixedAdapters.rows`` (rows are dropped from it too).
    """
    n = speech.size(0)
    enc, enc_lens = model.encode(speech, lengths)
    if isinstance(enc, tuple):  # intermediate CTC outputs
        enc = enc[0]
    stepper = _Stepper(model, enc, enc_lens, incremental)
    device = enc.device
    if force_steps is not None:
        maxlen = torch.full((n,), int(force_steps), dtype=torch.long)
    else:
        ratios = [maxlenratio] * n if isinstance(maxlenratio, (int, float)) else list(maxlenratio)
        maxlen = torch.tensor([max_output_length(r, int(t)) for r, t in zip(ratios, enc_lens.tolist())],
                              dtype=torch.long)
    ys = torch.tensor(list(primer), dtype=torch.long, device=device).expand(n, -1).contiguous()
    alive = torch.arange(n)  # original row of each running row
    out: List[List[int]] = [[] for _ in range(n)]
    steps = 0
    for step in range(int(maxlen.max())):
        logp = stepper(ys)
        steps += 1
        best = logp.topk(1, dim=-1).indices[:, 0]  # ESPnet's beam of 1 takes topk(1) as well
        best_cpu = best.tolist()
        done = []
        for j, (row, tok) in enumerate(zip(alive.tolist(), best_cpu)):
            if force_steps is None and tok == eos:
                done.append(j)
                continue
            out[row].append(tok)
            if force_steps is None and len(out[row]) >= int(maxlen[row]):
                done.append(j)
        ys = torch.cat([ys, best[:, None]], dim=1)
        if force_steps is not None:
            if step + 1 >= force_steps:
                break
            continue
        if done:
            keep = [j for j in range(len(best_cpu)) if j not in set(done)]
            if not keep:
                break
            keep_t = torch.tensor(keep, dtype=torch.long)
            alive = alive[keep_t]
            ys = ys[keep_t.to(device)]
            stepper.select(keep_t.to(device))
            if rows is not None:
                rows.select(keep)
    return out, steps


# --------------------------------------------------------------------------- utterances -> texts
def _speech2text(rec):
    return getattr(rec, "s2t", rec)


def greedy_settings(s2t) -> Tuple[List[int], int, float]:
    """(primer, eos, maxlenratio) of a ``Speech2Text``: what its beam search starts and stops with."""
    bs = s2t.beam_search
    primer = list(bs.hyp_primer) if getattr(bs, "hyp_primer", None) else [bs.sos]
    return primer, int(bs.eos), float(s2t.maxlenratio)


class NotGreedyError(ValueError):
    """The decoding config is not greedy search on the decoder score."""


def utterance_maxlenratio(rec, n_samples: int) -> float:
    """The length guard ``rec`` applies to an utterance of ``n_samples``: a ``Recognizer``'s own
    (``Recognizer.maxlenratio``), or a plain ``Speech2Text``'s ``maxlenratio``."""
    if hasattr(rec, "maxlenratio") and callable(rec.maxlenratio):
        return rec.maxlenratio(n_samples)
    return float(_speech2text(rec).maxlenratio)


def check_greedy(s2t) -> None:
    """Raise unless ``Speech2Text`` is configured for greedy search on the decoder score alone (then its
    hypotheses are exactly what batched greedy decoding produces)."""
    bs = s2t.beam_search
    others = {k: w for k, w in bs.weights.items() if k != "decoder" and w and k in bs.scorers}
    problems = []
    if bs.beam_size != 1:
        problems.append(f"beam_size={bs.beam_size}")
    if others:
        problems.append(f"other scores weighted {others}")
    if s2t.minlenratio != 0:
        problems.append(f"minlenratio={s2t.minlenratio}")
    if problems:
        raise NotGreedyError("batched decoding is greedy on the decoder score: the decoding config has "
                         + ", ".join(problems) + " (use beam_size: 1, ctc_weight: 0, lm_weight: 0, penalty: 0, "
                         "minlenratio: 0)")


def tokens_to_text(s2t, primer: Sequence[int], token_ids: Sequence[int]) -> str:
    """``Speech2Text``'s conversion of ``yseq[1:-1]``: blank (id 0) removed, special tokens skipped."""
    token_int = [t for t in list(primer[1:]) + list(token_ids) if t != 0]
    tokens = s2t.converter.ids2tokens(token_int)
    return s2t.tokenizer.tokens2text(tokens) if s2t.tokenizer is not None else " ".join(tokens)


def padded_length(model, n_samples: int) -> Optional[int]:
    """Samples a Whisper encoder sees for an utterance of ``n_samples`` (None: not a padded encoder)."""
    from espnet2.asr.encoder.whisper_encoder import OpenAIWhisperEncoder

    enc = model.encoder
    if not isinstance(enc, OpenAIWhisperEncoder):
        return None
    if enc.do_pad_trim:
        return int(enc.pad_samples)
    target = int(getattr(enc, "pad_to_seconds", 0.0) * 16000)
    return max(n_samples, target)


def plan_batches(model, lengths: Sequence[int], batch_size: int) -> List[Tuple[List[int], Optional[int]]]:
    """Split utterance indices into batches (same encoder window within a batch); keeps input order."""
    groups: Dict[Optional[int], List[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        groups[padded_length(model, n)].append(i)
    out = []
    for key, idx in groups.items():
        for s in range(0, len(idx), batch_size):
            out.append((idx[s: s + batch_size], key))
    return out


def _as_tensor(x: Speech) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()


def decode_token_ids(rec, speeches: Sequence[Speech], adapter_names: Optional[Sequence[Optional[str]]] = None,
                     mixed=None, batch_size: int = 32, force_steps: Optional[int] = None,
                     incremental: bool = True) -> List[List[int]]:
    """Token ids (without end-of-text) of every utterance; see ``batch_decode``."""
    s2t = _speech2text(rec)
    model = s2t.asr_model
    primer, eos, _ = greedy_settings(s2t)
    if adapter_names is not None:
        if mixed is None:
            raise ValueError("adapter_names needs the MixedAdapters the speakers' adapters were loaded with")
        if len(adapter_names) != len(speeches):
            raise ValueError(f"{len(adapter_names)} adapter names for {len(speeches)} utterances")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wavs = [_as_tensor(s) for s in speeches]
    device = next(model.parameters()).device
    results: List[List[int]] = [[] for _ in wavs]
    for idx, key in plan_batches(model, [w.numel() for w in wavs], batch_size):
        if key is not None:
            width = key
            lens = torch.full((len(idx),), key, dtype=torch.long)
        else:
            lens = torch.tensor([wavs[i].numel() for i in idx])
            width = int(lens.max())
        batch = torch.zeros(len(idx), width)
        for j, i in enumerate(idx):
            w = wavs[i][:width]
            batch[j, : w.numel()] = w
        batch, lens = batch.to(device), lens.to(device)
        maxlenratio = [utterance_maxlenratio(rec, wavs[i].numel()) for i in idx]
        if adapter_names is not None:
            with mixed.rows([adapter_names[i] for i in idx]) as rows:
                ids, _ = greedy_search(model, batch, lens, primer=primer, eos=eos, maxlenratio=maxlenratio,
                                       force_steps=force_steps, incremental=incremental, rows=rows)
        else:
            ids, _ = greedy_search(model, batch, lens, primer=primer, eos=eos, maxlenratio=maxlenratio,
                                   force_steps=force_steps, incremental=incremental)
        for j, i in enumerate(idx):
            results[i] = ids[j]
    return results


def batch_decode(rec, speeches: Sequence[Speech], adapter_names: Optional[Sequence[Optional[str]]] = None,
                 mixed=None, batch_size: int = 32, incremental: bool = True) -> List[str]:
    """Greedy transcripts of ``speeches`` (16 kHz waveforms), ``batch_size`` utterances per forward.

    ``rec``: a ``Recognizer`` (or ESPnet ``Speech2Text``); its decoding config gives the length guard
    (``maxlenratio``) and the text conversion. ``adapter_names[i]`` (with ``mixed``, the
    ``MixedAdapters`` holding the speakers' adapters): the adapter of utterance ``i``; ``None`` or
    ``"__base__"`` decodes it with the base alone.
    """
    s2t = _speech2text(rec)
    primer, _, _ = greedy_settings(s2t)
    ids = decode_token_ids(rec, speeches, adapter_names, mixed, batch_size, incremental=incremental)
    return [tokens_to_text(s2t, primer, t) for t in ids]

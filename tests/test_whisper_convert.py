"""The bundled Whisper tiny.en (CTranslate2) converted for openai-whisper / ESPnet, and our decoder.

The conversion must fit openai-whisper's model exactly and transcribe synthesised speech; the
incremental decoder (self-attention KV states, cached cross-attention) must score like ESPnet's
full recomputation and give the same beam-search hypotheses.
"""
from __future__ import annotations

import logging
import re

import jiwer
import pytest
import soundfile as sf
import torch

from espnet2.asr.decoder.whisper_decoder import OpenAIWhisperDecoder
from pqm_ext.models.ct2_whisper import bundled_tiny_en_dir, ct2_to_whisper_checkpoint, read_ct2_model
from pqm_ext.models.whisper import PQMWhisperDecoder
from pqm_ext.utils.errors import InputError

TINY_EN_DIMS = dict(n_mels=80, n_vocab=51864, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6,
                    n_audio_layer=4, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)


def normalize(text: str) -> str:
    """Lower case, punctuation removed (apostrophes kept), single spaces."""
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def recognizer(whisper_base_dir, whisper_decode_conf):
    from pqm_ext.asr.recognizer import Recognizer

    return Recognizer(whisper_base_dir, whisper_decode_conf)


@pytest.fixture(scope="module")
def utterances(synth, sentences):
    return [(sf.read(synth(s), dtype="float32")[0], s) for s in sentences]


# --------------------------------------------------------------------------- conversion
def test_conversion_fits_openai_whisper_strictly(whisper_ckpt):
    from whisper.model import ModelDimensions, Whisper

    assert whisper_ckpt["dims"] == TINY_EN_DIMS
    sd = whisper_ckpt["model_state_dict"]
    model = Whisper(ModelDimensions(**whisper_ckpt["dims"]))
    expected = model.state_dict()
    # Whisper has no key bias; the sinusoidal audio positions are a buffer it computes itself but keeps.
    assert set(sd) == set(expected)
    assert not any(k.endswith("key.bias") for k in sd)
    for k, v in sd.items():
        assert tuple(v.shape) == tuple(expected[k].shape), k
    model.load_state_dict(sd, strict=True)
    # The audio positions are the standard sinusoids openai-whisper builds (float16 in the file).
    torch.testing.assert_close(sd["encoder.positional_embedding"].float(), expected["encoder.positional_embedding"],
                               rtol=0, atol=2e-3)
    # Fused q/k/v (and cross-attention k/v) were split into three (two) different matrices; the order
    # is checked by the transcription tests.
    for prefix in ("encoder.blocks.0.attn", "decoder.blocks.3.attn", "decoder.blocks.3.cross_attn"):
        q, k, v = (sd[f"{prefix}.{n}.weight"] for n in ("query", "key", "value"))
        assert not (torch.equal(q, k) or torch.equal(k, v) or torch.equal(q, v)), prefix


def test_openai_whisper_transcribes_with_converted_weights(whisper_ckpt, utterances):
    """Independent of ESPnet: openai-whisper's own greedy decoding (30 s padded, as it is trained)."""
    import whisper
    from whisper.model import ModelDimensions, Whisper

    model = Whisper(ModelDimensions(**whisper_ckpt["dims"]))
    model.load_state_dict({k: v.float() for k, v in whisper_ckpt["model_state_dict"].items()})
    model.eval()
    wav, text = utterances[1]
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(wav)))
    with torch.no_grad():
        result = whisper.decode(model, mel, whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False))
    assert jiwer.wer(normalize(text), normalize(result.text)) <= 0.2, result.text


def test_bad_ct2_files_are_input_errors(tmp_path):
    src = bundled_tiny_en_dir() / "model.bin"
    bad = tmp_path / "model.bin"
    bad.write_bytes(src.read_bytes()[:100000])
    with pytest.raises(InputError, match="truncated or corrupt") as err:
        read_ct2_model(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(InputError, match="not found"):
        ct2_to_whisper_checkpoint(tmp_path / "nowhere")


# --------------------------------------------------------------------------- recognition
@pytest.mark.slow
def test_recognizer_transcribes_synthesised_speech(recognizer, utterances):
    refs, hyps = [], []
    for wav, text in utterances:
        refs.append(normalize(text))
        hyps.append(normalize(recognizer(wav)))
    wer = jiwer.wer(refs, hyps)
    assert wer <= 0.3, list(zip(refs, hyps))


# --------------------------------------------------------------------------- incremental decoder
def test_incremental_batch_score_matches_full_recomputation(whisper_fp, utterances, whisper_tokenizer):
    dec = whisper_fp.decoder
    assert isinstance(dec, PQMWhisperDecoder)
    tok = whisper_tokenizer
    wav = torch.from_numpy(utterances[0][0])[None]
    with torch.no_grad():
        enc, _ = whisper_fp.encode(wav, torch.tensor([wav.shape[1]]))
        x = enc[0]
        # Two hypotheses with different prefixes, as a beam of 2 would have them.
        ys = torch.tensor([[tok.sot, tok.no_timestamps], [tok.sot, tok.no_timestamps]])
        states = [None, None]
        for step in range(5):
            xs = x.expand(ys.size(0), *x.shape)
            ours, states = dec.batch_score(ys, states, xs)
            full, _ = OpenAIWhisperDecoder.batch_score(dec, ys, [None] * ys.size(0), xs)
            torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-4)
            top2 = full[0].topk(2).indices
            nxt = torch.stack([top2[0], top2[1]] if step == 0 else [full[0].argmax(), full[1].argmax()])
            ys = torch.cat([ys, nxt[:, None]], dim=1)
            if step == 2:  # beam search reorders hypotheses and their states together
                ys, states = ys.flip(0), states[::-1]


def test_cross_attention_cache_follows_the_utterance(whisper_fp, utterances, whisper_tokenizer):
    """Utterances sliced from one batched encoder output, decoded one after the other, and a batch of
    two different utterances, each get their own cross-attention keys/values."""
    dec = whisper_fp.decoder
    tok = whisper_tokenizer
    ys = torch.tensor([[tok.sot, tok.no_timestamps]])
    with torch.no_grad():
        wavs = [torch.from_numpy(w[: 32000]) for w, _ in utterances[:2]]
        batch = torch.stack(wavs)
        enc, _ = whisper_fp.encode(batch, torch.tensor([32000, 32000]))
        for i in (0, 1, 0):
            x = enc[i]
            ours, _ = dec.batch_score(ys, [None], x.expand(1, *x.shape))
            full, _ = OpenAIWhisperDecoder.batch_score(dec, ys, [None], x.expand(1, *x.shape))
            torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-4)
        ys2 = ys.expand(2, -1)
        ours, _ = dec.batch_score(ys2, [None, None], enc)
        full, _ = OpenAIWhisperDecoder.batch_score(dec, ys2, [None, None], enc)
        torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_beam_search_gives_the_same_hypotheses(recognizer, utterances, monkeypatch):
    wav = utterances[2][0]
    with torch.no_grad():
        ours = recognizer.s2t(wav)[0]
        monkeypatch.setattr(PQMWhisperDecoder, "batch_score", OpenAIWhisperDecoder.batch_score)
        full = recognizer.s2t(wav)[0]
    assert ours[0] == full[0] and ours[2] == full[2]
    assert torch.equal(ours[3].yseq, full[3].yseq)
    assert abs(float(ours[3].score) - float(full[3].score)) < 1e-3
    assert normalize(ours[0]) == normalize(utterances[2][1])


def test_an_utterance_longer_than_whispers_window_is_reported(caplog):
    """ESPnet's Whisper encoder keeps the first 30 s of its input: an utterance cut there would train or
    score against words the model never heard, so the encoder says so instead of cutting silently."""
    from pqm_ext.models.whisper import PQMWhisperEncoder

    dims = dict(TINY_EN_DIMS, n_audio_state=8, n_audio_head=1, n_audio_layer=1)
    encoder = PQMWhisperEncoder(dims=dims, pad_to_seconds=8).eval()
    speech = torch.randn(2, 31 * 16000) * 0.01
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="pqm_ext.models.whisper"):
        out, out_lens, _ = encoder(speech, torch.tensor([31 * 16000, 5 * 16000]))
    assert out.shape[1] == 1500  # 30 s of encoder frames: the last second is gone
    assert "1 utterance(s) longer than Whisper's 30 s window" in caplog.text and "longest 31.0 s" in caplog.text
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="pqm_ext.models.whisper"):
        encoder(speech[:, :30 * 16000], torch.tensor([30 * 16000, 5 * 16000]))
    assert "longer than Whisper" not in caplog.text

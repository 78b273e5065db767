"""Corpus preparation: Kaldi-style data dirs for LibriSpeech-SA and TED-LIUM 3, their validation and the
stage-2 formatter that writes 16 kHz WAV files for ESPnet."""

"""Offline demo corpora: miniature LibriSpeech and TED-LIUM 3 trees synthesised with Debian's TTS voices."""

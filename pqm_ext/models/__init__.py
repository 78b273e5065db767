"""Model builders registered into ESPnet (Whisper from local checkpoints) and weight converters."""

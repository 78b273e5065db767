"""ESPnet tasks extended with NF4 quantisation and LoRA adapters."""

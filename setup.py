"""PQM toolkit: NF4 quantisation + LoRA personalisation of ESPnet ASR models (Conformer AED and Whisper)."""
from setuptools import find_packages, setup

setup(
    name="pqm_ext",
    version="0.1.0",
    description="Personalised quantised ASR models: NF4 + LoRA speaker adaptation for ESPnet",
    packages=find_packages(include=["pqm_ext", "pqm_ext.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch", "torchaudio", "espnet", "bitsandbytes", "peft", "sentencepiece", "jiwer", "kaldiio",
        "soundfile", "safetensors", "PyYAML", "tqdm", "matplotlib",
    ],
)

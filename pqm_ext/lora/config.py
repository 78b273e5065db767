"""LoRA adapter settings (what a speaker adapter is), validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from pqm_ext.lora.batchnorm import MODES as BATCHNORM_MODES
from pqm_ext.utils.options import dataclass_from_dict


@dataclass
class AdapterConfig:
    """One LoRA adapter.

    rank/alpha/dropout: LoRA's r, scaling numerator (scale = alpha / rank) and input dropout.
    target_modules: module-name patterns (globs on dot boundaries, see ``pqm_ext.patterns``);
                    matching no layer is an error.
    batchnorm: ``frozen``: BatchNorm layers stay in inference mode while the adapter trains, so the
               base's running statistics are what the adapter is trained against and decoded with;
               ``speaker``: they are re-estimated on the speaker's data and saved with the adapter
               (pqm_ext.lora.batchnorm).
    """

    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=list)
    batchnorm: str = "frozen"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"LoRA batchnorm must be one of {BATCHNORM_MODES}, got {self.batchnorm!r}")

    @classmethod
    def from_dict(cls, conf: Optional[dict]) -> "AdapterConfig":
        conf = dict(conf or {})
        if "freeze_batchnorm" in conf:  # adapters saved before ``batchnorm`` existed
            if conf.pop("freeze_batchnorm") is not True:
                raise ValueError("LoRA freeze_batchnorm: false is no longer an option (statistics that move "
                                 "in training must be saved with the adapter): use batchnorm: speaker")
            if conf.setdefault("batchnorm", "frozen") != "frozen":
                raise ValueError("LoRA freeze_batchnorm (the old name) and batchnorm disagree: give batchnorm only")
        return dataclass_from_dict(cls, conf, "LoRA")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

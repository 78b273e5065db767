"""Where a recipe's experiment outputs live, and which systems stage 8 decodes.

    exp/<model>/base/                    full-precision model (stage 4)
    exp/<model>/<nf4|int4|...>/          quantised models + size reports (stage 5)
    exp/<model>/lora_pretrain/adapter/   multi-speaker pretrained LoRA (stage 6)
    exp/<model>/adapt/<init>/n<N>/<spk>/adapter/   speaker adapters (stage 7; init: scratch|pretrained|semi)
    exp/<model>/decode/<system>/hyp/<spk>.txt      hypotheses per speaker (stage 8)
    exp/<model>/RESULTS.md, results.json, wer_vs_n.png

With a tag (``--tag T``, a variant beside the default table, as ESPnet's ``--asr_tag``), stages 6-8
write ``lora_pretrain/``, ``adapt/``, ``decode/`` and the results under ``exp/<model>/T/`` instead,
and read the base and quantised models from ``exp/<model>/``: each tag holds a complete table. A tag
whose stage 6 was not run starts PQM from the default ``lora_pretrain/``.

One module knows this layout, so the stages, decoding and result tables cannot disagree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

# Directories of exp/<model>/ a tag must not shadow (with the quantised models', named after conf/quant_*.yaml).
RESERVED = {"base", "base_train", "lora_pretrain", "adapt", "decode", "pseudo_labels", "nf4", "nf4_dq", "int4",
            "RESULTS.md", "results.json", "wer_vs_n.png"}

# System names in result files (results.json "systems" keys) by adaptation init.
INIT_SYSTEM = {"scratch": "lora_scratch", "pretrained": "pqm", "semi": "pqm_semi"}


@dataclass(frozen=True)
class System:
    """A decodable system: a base model directory and, optionally, a per-speaker adapter."""

    name: str
    model_dir: Path
    adapter: Optional[str] = None  # path template with {spk}, or a fixed path
    group: str = ""                 # results.json key (e.g. "pqm")
    n_utts: Optional[int] = None    # adaptation utterances, for adapted systems

    def adapter_for(self, spk: str) -> Optional[Path]:
        return None if self.adapter is None else Path(self.adapter.format(spk=spk))


def tag_problem(tag: str, quant_labels: Iterable[str] = ()) -> Optional[str]:
    """Why ``tag`` cannot name a variant's directory beside base/ and nf4/ (None if it can, or is empty).
    pqm.sh asks before any stage runs, with the labels of the recipe's conf/quant_*.yaml."""
    reserved = RESERVED | set(quant_labels)
    if re.search(r"\bJOB\b", tag):  # the launchers put the job's number for the word JOB in paths
        return f"--tag '{tag}': the word JOB in it would become each job's number (JOB=1:N); choose another"
    if not tag or (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag) and tag not in reserved):
        return None
    return (f"--tag '{tag}': a directory name beside base/ and nf4/ (letters, digits, '.', '_', '-'), "
            f"not one of {', '.join(sorted(reserved))}")


@dataclass(frozen=True)
class ExpLayout:
    root: Path
    quant: str = "nf4"
    tag: str = ""

    def __post_init__(self):
        problem = tag_problem(self.tag, [self.quant])
        if problem:
            raise ValueError(problem)

    @property
    def work(self) -> Path:
        """Where stages 6-8 write: ``root``, or ``root/<tag>`` for a variant."""
        return self.root / self.tag if self.tag else self.root

    @property
    def base(self) -> Path:
        return self.root / "base"

    def quantized(self, label: Optional[str] = None) -> Path:
        return self.root / (label or self.quant)

    @property
    def pretrain(self) -> Path:
        """Stage 6's output. A tag without one of its own uses the default's: most variants change only
        the speaker adaptation (stage 7) and should not pay for the same pretraining again."""
        own = self.work / "lora_pretrain"
        if self.tag and not (own / "adapter").is_dir() and (self.root / "lora_pretrain" / "adapter").is_dir():
            return self.root / "lora_pretrain"
        return own

    def adapt(self, init: str, n: int, spk: str) -> Path:
        return self.work / "adapt" / init / f"n{n}" / spk

    def adapters(self, init: str) -> List[Path]:
        """Every adapter stage 7 has written for ``init``, whatever its N and speaker (sorted)."""
        return sorted((self.work / "adapt" / init).glob("n*/*/adapter"))

    def decode(self, system: str) -> Path:
        return self.work / "decode" / system

    def systems(self, nutts: Sequence[int], inits: Sequence[str], baselines: Sequence[str] = ("int4",),
                with_pretrained: bool = True) -> List[System]:
        out = [System("fp", self.base, group="fp"), System(self.quant, self.quantized(), group=self.quant)]
        out += [System(b, self.quantized(b), group=b) for b in baselines]
        if with_pretrained:
            out.append(System("lora_pretrained", self.quantized(), str(self.pretrain / "adapter"),
                              group="lora_pretrained"))
        for init in inits:
            for n in nutts:
                template = str(self.work / "adapt" / init / f"n{n}" / "{spk}" / "adapter")
                out.append(System(f"{INIT_SYSTEM[init]}_n{n}", self.quantized(), template, INIT_SYSTEM[init], n))
        return out


def add_tag_argument(parser) -> None:
    """``--tag``, the same for every stage that reads the layout (stages 7 and 8)."""
    parser.add_argument("--tag", default="",
                        help="a variant's directory under exp_dir for stages 6-8 (see pqm_ext.asr.layout)")


def layout_of(args) -> ExpLayout:
    """The layout a stage's ``--exp_dir``, ``--quant`` and ``--tag`` name (a bad tag, one naming the quantised
    model or a baseline too: an argparse-style error)."""
    problem = tag_problem(args.tag, [args.quant, *getattr(args, "baselines", [])])
    if problem:
        raise SystemExit(f"error: {problem}")
    return ExpLayout(Path(args.exp_dir), quant=args.quant, tag=args.tag)

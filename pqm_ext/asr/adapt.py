"""Speaker adaptive training: one LoRA adapter per target speaker, N and initialisation.

For each speaker the first N utterances of ``data/sa_splits/<spk>.adapt`` are the adaptation
set. ``scratch`` trains a fresh adapter; ``pretrained`` (PQM) starts from the multi-speaker
pretrained LoRA; ``semi`` is PQM trained on pseudo-labels (a teacher's decoding, any ``text``
file) instead of the references — the paper's semi-supervised variant.

ESPnet's trainer needs a validation set. By default it is the first two adaptation utterances
(also trained on), whose loss is only logged, and the last epoch's adapter is kept. With
``valid_fraction`` f > 0 the last max(1, round(f*N)) of the N utterances are held out instead: the
adapter trains on the rest and the epoch with the lowest held-out loss is kept (early stopping: a
speaker the base already recognises is not over-trained). No test data is ever seen.

Every (speaker, N, init) is a unit of work: skipped when its adapter exists and was made from the same
inputs (options, base, pretrained adapter, utterances; ``pqm_ext.asr.train``), and a failure is
recorded while the other units go on.
"""
from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from pqm_ext.asr.layout import ExpLayout
from pqm_ext.asr.train import ADAPTER, train_adapter
from pqm_ext.data.kaldi_dir import DataDir
from pqm_ext.data.text import drop_annotations, normalise_text
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import atomic_dir, unit_of_work

logger = logging.getLogger(__name__)
INITS = ("scratch", "pretrained", "semi")
VALID_UTTS = 2


def split_train_valid(utts: Sequence[str], valid_fraction: float) -> Tuple[List[str], List[str]]:
    """(training, validation) utterances of one adaptation set; see the module docstring."""
    utts = list(utts)
    if valid_fraction <= 0:
        return utts, utts[:VALID_UTTS]
    k = max(1, round(valid_fraction * len(utts)))
    if k >= len(utts):
        raise ValueError(f"valid_fraction {valid_fraction} holds out all {len(utts)} adaptation utterances")
    return utts[:-k], utts[-k:]


def read_split(path: Path) -> List[str]:
    if not path.is_file():
        raise InputError(path, "speaker split file not found (is the speaker a target speaker of this data dir?)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_labels(path: Path) -> Dict[str, str]:
    """``<utt> <hypothesis>`` lines, each put in the corpus's normal form: a teacher such as Whisper writes
    cased, punctuated text, and the adapter it teaches must learn the same target form as the references
    that trained its initial LoRA and the other adapters. One with digits is empty (left out)."""
    labels, numbers = {}, []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            text = parts[1] if len(parts) > 1 else ""
            # "3 cats": the normal form cannot spell 3, and "CATS" teaches a deletion (not has_digits, whose
            # "(2)" is an stm pronunciation variant: in a teacher's text "(1998)" is a year)
            if any(c.isdigit() for c in text):
                numbers.append(parts[0])
                text = ""
            labels[parts[0]] = normalise_text(drop_annotations(text))
    if numbers:
        logger.warning("%s: %d pseudo-label(s) hold digits, which the references' form cannot spell (as the corpus "
                       "readers leave out such transcripts): taken as empty (%s)", path, len(numbers),
                       ", ".join(numbers[:5]) + (", ..." if len(numbers) > 5 else ""))
    return labels


def with_pseudo_labels(utts: Sequence[str], labels: Dict[str, str], labels_path) -> List[str]:
    """The utterances to train on with pseudo-labels. One the teacher decoded to nothing has nothing to teach and
    is left out (logged); one missing from the file is an error (the wrong file, or a failed decoding job)."""
    absent = [u for u in utts if u not in labels]
    if absent:
        raise InputError(labels_path, f"no pseudo-label for {absent[0]} ({len(absent)} missing)")
    kept = [u for u in utts if labels[u].strip()]
    if not kept:
        raise InputError(labels_path, f"every pseudo-label of {utts[0]}..{utts[-1]} is empty: nothing to adapt to")
    if len(kept) < len(utts):
        logger.warning("%s: %d of %d adaptation utterances have an empty pseudo-label and are left out (%s)",
                       labels_path, len(utts) - len(kept), len(utts), ", ".join(u for u in utts if u not in kept))
    return kept


def adaptation_set(data: DataDir, utts: Sequence[str], labels: Optional[Dict[str, str]], labels_path=None) -> DataDir:
    subset = data.subset(utts)
    if labels is not None:
        missing = [u for u in utts if not labels.get(u, "").strip()]
        if missing:
            raise InputError(labels_path, f"no pseudo-label for {missing[0]} ({len(missing)} missing)")
        subset.text = {u: labels[u] for u in subset.text}
    return subset


def adapt_speaker(layout: ExpLayout, spk: str, data: DataDir, splits_dir: Path, nutts: Sequence[int],
                  inits: Sequence[str], configs: Dict[str, List[str]], pseudo_text: Optional[Path] = None,
                  ngpu: int = 0, seed: int = 0, keep_checkpoints: bool = False,
                  train_args: Sequence[str] = (), valid_fraction: float = 0.0) -> List[str]:
    """Train every (N, init) adapter of ``spk``; return failures as human-readable lines."""
    order = read_split(Path(splits_dir) / f"{spk}.adapt")
    labels = read_labels(Path(pseudo_text)) if pseudo_text and "semi" in inits else None
    failures = []
    for n in nutts:
        if n > len(order):
            failures.append(f"{spk} n={n}: {splits_dir}/{spk}.adapt has only {len(order)} adaptation utterances")
            continue
        for init in inits:
            out = layout.adapt(init, n, spk)
            try:
                with unit_of_work(out, "train"):  # alone on it; a killed run's temporaries swept
                    if init == "semi" and labels is None:
                        raise ValueError("init 'semi' needs pseudo-labels (--pseudo_text)")
                    utts = with_pseudo_labels(order[:n], labels, pseudo_text) if init == "semi" else order[:n]
                    train_utts, valid_utts = split_train_valid(utts, valid_fraction)
                    subset = adaptation_set(data, utts, labels if init == "semi" else None, pseudo_text)
                    data_dir, valid_dir = out / "data", out / "data_valid"
                    # Rewritten every time (they are small): a unit resumed with another valid_fraction or other
                    # pseudo-labels must not train on the split an earlier run wrote.
                    for path, part in ((data_dir, subset.subset(train_utts)), (valid_dir, subset.subset(valid_utts))):
                        with atomic_dir(path, overwrite=True) as tmp:
                            part.write(tmp)
                    init_adapter = str(layout.pretrain / ADAPTER) if init in ("pretrained", "semi") else None
                    early_stopping = valid_fraction > 0
                    info = {"speaker": spk, "n_utts": n, "init": init, "trained_on": len(train_utts),
                            "held_out": len(valid_utts) if early_stopping else 0,
                            "labels": str(pseudo_text) if init == "semi" else "reference"}
                    train_adapter(layout.quantized(), configs[init], data_dir, valid_dir, out,
                                  init_adapter=init_adapter, ngpu=ngpu, seed=seed, info=info,
                                  extra_args=list(train_args),
                                  overrides={"adapter_select": "best" if early_stopping else "last"},
                                  keep_checkpoints=keep_checkpoints)
                    logger.info("%s n=%d init=%s: adapter ready", spk, n, init)
            except (Exception, SystemExit) as e:  # one unit's failure must not cost the others (SystemExit: ESPnet's
                # parser refusing an option of --adapt_args ended the job without its summary of failed units)
                logger.error("%s n=%d init=%s failed:\n%s", spk, n, init, traceback.format_exc())
                failures.append(f"{spk} n={n} init={init}: {type(e).__name__}: {e}")
    return failures


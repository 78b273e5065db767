r"""ESPnet's ASR task with NF4 quantisation and peft LoRA, without forking ESPnet.

``PQMASRTask`` is ``ASRTask`` plus options saved in ``config.yaml`` like ESPnet's own:
``--base_model_file`` (the frozen base: a quantised or full-precision model file),
``--quant_conf`` (a ``QuantConfig``; applied when the base is full precision), ``--lora_conf``
(an ``AdapterConfig``; its absence means no adapter), ``--init_adapter`` (initialise LoRA from
a saved adapter, e.g. the multi-speaker pretrained one) and ``--adapter_out/_info/_select`` (where
the trained adapter is saved, what its metadata records, and whether the last or the best epoch's).
Training, checkpointing, resuming and
``Speech2Text`` decoding stay ESPnet's.

For Whisper targets (``token_type: whisper_en``), the preprocessor writes the transcript as Whisper
does (leading space, sentence case); ESPnet's Whisper token converter prefixes ``<|notimestamps|>``,
so training matches the ``<|startoftranscript|><|notimestamps|>`` prompt ESPnet decodes with.
With ESPnet's noise or RIR augmentation on (stage 6's ``--noise_scp``/``--rir_scp``), training speech is
handed on mono, as it came in.

Used by ``pqm_ext.asr.train`` (stages 6 and 7); directly, as ESPnet's ``asr_train`` is:
    python -c 'from pqm_ext.tasks.pqm_asr import PQMASRTask; PQMASRTask.main()' --config train.yaml \
        --base_model_file exp/whisper/nf4/model.safetensors ...
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from espnet2.tasks.asr import ASRTask
from espnet2.torch_utils.device_funcs import to_device
from espnet2.train.trainer import Trainer
from espnet2.utils.nested_dict_action import NestedDictAction
from espnet2.utils.types import str_or_none
from pqm_ext.asr.model_io import load_base
from pqm_ext.lora import AdapterConfig, add_adapter, load_initial_adapter, save_adapter
from pqm_ext.lora.batchnorm import reestimate_statistics
from pqm_ext.models.whisper import register_espnet_classes
from pqm_ext.quant import QuantConfig, quantize_model

logger = logging.getLogger(__name__)


def whisper_text(text: str) -> str:
    """Corpus text (upper case, no punctuation) written the way Whisper emits it."""
    text = text.strip().lower()
    return " " + text[:1].upper() + text[1:]


class _WhisperTargets:
    """Wrap a preprocessor: transcripts reach Whisper's tokenizer cased and spaced as Whisper writes."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, uid: str, data: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if "text" in data and isinstance(data["text"], str):
            data = dict(data, text=whisper_text(data["text"]))
        return self.inner(uid, data)


class _MonoSpeech:
    """Wrap a training preprocessor with noise or RIR lists: ESPnet then hands every utterance back as
    (time, 1), augmented or not, which the Conformer's frontend reads as one microphone of an array and
    Whisper's encoder not at all; give (time,). (pqm_ext.asr.augment admits mono noise and RIRs only.)"""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, uid: str, data: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        data = self.inner(uid, data)
        speech = data.get("speech")
        if isinstance(speech, np.ndarray) and speech.ndim == 2 and speech.shape[1] == 1:
            data["speech"] = speech[:, 0]
        return data


def restore_best_adapter(model: torch.nn.Module, output_dir: Path, criterion) -> int:
    """Load the LoRA weights of ESPnet's best epoch by ``criterion`` into ``model``; return that epoch.

    ESPnet links ``<phase>.<key>.best.pth`` to the best epoch's model file and keeps that file (it is
    among the n best); only the adapter's tensors are taken from it, the frozen base is not reloaded.
    """
    phase, key, _ = criterion
    best = Path(output_dir) / f"{phase}.{key}.best.pth"
    if not best.exists():
        raise RuntimeError(f"{best} is missing: no epoch was validated on {phase} {key}")
    state = torch.load(best, map_location="cpu")
    lora = {k: v for k, v in state.items() if "lora_A." in k or "lora_B." in k}
    unexpected = model.load_state_dict(lora, strict=False).unexpected_keys
    if not lora or unexpected:
        raise RuntimeError(f"{best}: no LoRA weights for this model ({len(lora)} tensors, {len(unexpected)} unknown)")
    return int(best.resolve().name[:-len("epoch.pth")])


class AdapterExportTrainer(Trainer):
    """ESPnet's trainer; when training ends, the trained adapter is saved in peft's format.

    The model in memory is then the last epoch's (or, for a finished run that is resumed, the
    checkpoint's), so exporting it avoids rebuilding it from ``latest.pth``. With ``adapter_select:
    best`` the best epoch's LoRA weights by the first ``best_model_criterion`` are restored first:
    early stopping on a held-out validation set, without stopping the run. With ``batchnorm: speaker``
    the BatchNorm statistics are then estimated on the training data for those weights
    (pqm_ext.lora.batchnorm.reestimate_statistics) and saved with them.
    """

    @classmethod
    def run(cls, model, *args, **kwargs) -> None:
        super().run(model, *args, **kwargs)
        export = getattr(model, "pqm_adapter_export", None)
        if export and export.get("out"):
            opts = kwargs["trainer_options"]
            epoch = opts.max_epoch
            if export.get("select") == "best":
                epoch = restore_best_adapter(model, opts.output_dir, opts.best_model_criterion[0])
                logger.info("restored the adapter of epoch %d (best %s)", epoch, ".".join(opts.best_model_criterion[0][:2]))
            info = dict(export.get("info") or {}, epochs=epoch, max_epoch=opts.max_epoch)
            if model.pqm_adapter_config.batchnorm == "speaker":
                device = "cuda" if opts.ngpu > 0 else "cpu"
                batches = (to_device(batch, device) for _, batch in
                           kwargs["train_iter_factory"].build_iter(epoch, shuffle=False))
                info["batchnorm_batches"] = reestimate_statistics(model, batches)
                logger.info("BatchNorm statistics estimated on %d training batches", info["batchnorm_batches"])
            save_adapter(model, export["out"], model.pqm_adapter_config, info=info)
            logger.info("saved adapter to %s", export["out"])


class PQMASRTask(ASRTask):
    trainer = AdapterExportTrainer
    @classmethod
    def get_parser(cls) -> argparse.ArgumentParser:
        register_espnet_classes()
        return super().get_parser()

    @classmethod
    def add_task_arguments(cls, parser: argparse.ArgumentParser):
        super().add_task_arguments(parser)
        group = parser.add_argument_group(description="PQM: quantised base and LoRA adapters")
        group.add_argument("--base_model_file", type=str_or_none, default=None,
                           help="Frozen base: a quantised (pqm-quantized-v1) or full-precision (pqm-fp-v1) "
                                "safetensors model file")
        group.add_argument("--quant_conf", action=NestedDictAction, default={"method": "none"},
                           help="Quantisation of a full-precision base (see pqm_ext.quant.QuantConfig)")
        group.add_argument("--lora_conf", action=NestedDictAction, default=None,
                           help="LoRA adapter (see pqm_ext.lora.AdapterConfig); none: no adapter")
        group.add_argument("--init_adapter", type=str_or_none, default=None,
                           help="Initialise the LoRA adapter from this adapter directory")
        group.add_argument("--adapter_out", type=str_or_none, default=None,
                           help="Save the trained adapter here (peft format) when training ends")
        group.add_argument("--adapter_info", action=NestedDictAction, default=None,
                           help="Facts recorded in the saved adapter's metadata (speaker, N, init, ...)")
        group.add_argument("--adapter_select", choices=("last", "best"), default="last",
                           help="Save the last epoch's adapter, or the best epoch's by the first "
                                "best_model_criterion (with a held-out validation set: early stopping)")

    @classmethod
    def build_model(cls, args: argparse.Namespace):
        register_espnet_classes()
        model = super().build_model(args)
        quant = QuantConfig.from_dict(getattr(args, "quant_conf", None) or {"method": "none"})
        base = getattr(args, "base_model_file", None)
        if base:
            load_base(model, base, quant)
        elif quant.enabled:
            quantize_model(model, quant)
        lora = getattr(args, "lora_conf", None)
        if lora:
            model.pqm_adapter_config = AdapterConfig.from_dict(lora)
            model.pqm_adapter_export = {"out": getattr(args, "adapter_out", None),
                                        "info": getattr(args, "adapter_info", None),
                                        "select": getattr(args, "adapter_select", "last")}
            add_adapter(model, model.pqm_adapter_config)
            if getattr(args, "init_adapter", None):
                load_initial_adapter(model, args.init_adapter, model.pqm_adapter_config)
                logger.info("initialised LoRA from %s", args.init_adapter)
        return model

    @classmethod
    def build_preprocess_fn(cls, args: argparse.Namespace, train: bool) -> Optional[Callable]:
        fn = super().build_preprocess_fn(args, train)
        if fn is not None and str(getattr(args, "token_type", "")).startswith("whisper"):
            fn = _WhisperTargets(fn)
        if fn is not None and train and (getattr(args, "noise_scp", None) or getattr(args, "rir_scp", None)):
            fn = _MonoSpeech(fn)
        return fn

r"""Stage 8 (decoding): every system on the target speakers' test sets, with their own adapters.

Systems: fp, the quantised base (nf4), baselines (int4), the pretrained LoRA alone, and per N the
speaker adapters trained from scratch (lora_scratch_n<N>) and from the pretrained LoRA (pqm_n<N>,
pqm_semi_n<N>). Beam search is ESPnet's (conf/<model>/decode.yaml). Output: exp/<model>[/<tag>]/decode/<system>/hyp.

Usage:
    python -m pqm_ext.bin.decode --exp_dir exp/whisper --data dump/raw/sa_test --speakers @spk.1 \
        --nutts 5 10 20 --inits scratch pretrained --decode_config conf/whisper/decode.yaml
    # greedy, 32 utterances of different speakers per batch, each with its own adapter:
    python -m pqm_ext.bin.decode ... --decode_config conf/whisper/decode.yaml --mixed_batch 32
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from espnet2.utils.types import str2bool

from pqm_ext.asr.batch_decode import NotGreedyError
from pqm_ext.asr.adapt import INITS
from pqm_ext.asr.decode import decode_systems
from pqm_ext.asr.layout import add_tag_argument, layout_of
from pqm_ext.asr.recognizer import read_decode_config
from pqm_ext.bin.adapt_speakers import speakers_of
from pqm_ext.data.kaldi_dir import read_data_dir
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.cli import entry_point


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp_dir", required=True)
    p.add_argument("--quant", default="nf4")
    p.add_argument("--baselines", nargs="*", default=["int4"])
    p.add_argument("--data", required=True, help="formatted test data dir")
    add_tag_argument(p)
    p.add_argument("--speakers", nargs="+", required=True, help="speaker ids, or @file")
    p.add_argument("--nutts", nargs="*", type=int, default=[])
    p.add_argument("--inits", nargs="*", choices=INITS, default=["scratch", "pretrained"])
    p.add_argument("--no_pretrained", action="store_true", help="skip the pretrained-LoRA-only system")
    p.add_argument("--systems", nargs="*", default=None, help="decode only these systems")
    p.add_argument("--decode_config", required=True)
    p.add_argument("--out_dir", default=None, help="default: <exp_dir>[/<tag>]/decode (e.g. pseudo-labels elsewhere)")
    p.add_argument("--ngpu", type=int, default=0)
    p.add_argument("--mixed_batch", type=int, default=0,
                   help="greedy decoding in batches of this many utterances from different speakers, each with "
                        "its own adapter (needs a greedy decode config: beam_size 1, ctc_weight 0); 0: one at a time")
    p.add_argument("--fold_adapters", type=str2bool, default=True,
                   help="decode each speaker with its adapter folded into the weights (W + B A s); false: "
                        "peft's unmerged LoRA (same hypotheses up to float rounding, slower)")
    return p


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    layout = layout_of(a)
    conf = read_decode_config(a.decode_config)  # before any model is loaded
    systems = layout.systems(a.nutts, a.inits, a.baselines, with_pretrained=not a.no_pretrained)
    if a.systems is not None:
        systems = [s for s in systems if s.name in a.systems]
    data = read_data_dir(a.data)
    if data.segments is not None:  # wav.scp then names recordings, not utterances
        raise InputError(Path(a.data) / "segments", "decoding reads one file per utterance: decode the data dir "
                                                    "stage 2 formatted (dump/raw/...), which has no segments")
    speakers = speakers_of(a.speakers)
    unknown = [s for s in speakers if s not in set(data.utt2spk.values())]
    if unknown:
        raise InputError(Path(a.data) / "utt2spk", f"unknown speaker(s) {unknown}")
    out_dir = Path(a.out_dir) if a.out_dir else layout.work / "decode"
    # a variant shares fp, the quantised bases and maybe the pretrained LoRA with the default table
    donors = [layout.root / "decode"] if layout.tag and not a.out_dir else []
    try:
        failures = decode_systems(systems, data, speakers, out_dir, conf,
                                  device="cuda" if a.ngpu > 0 else "cpu", mixed_batch=a.mixed_batch,
                                  fold_adapters=a.fold_adapters, donors=donors)
    except NotGreedyError as e:
        raise InputError(Path(a.decode_config), f"--mixed_batch: {e}") from e
    if failures:
        logging.error("not decoded:\n  %s", "\n  ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()

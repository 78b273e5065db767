r"""Stage 8 (scoring): RESULTS.md, results.json and wer_vs_n.png from the decoded hypotheses.

Usage:
    python -m pqm_ext.bin.make_results --exp_dir exp/whisper --data dump/raw/sa_test --model whisper \
        --corpus librispeech_sa --nutts 5 10 20 --inits scratch pretrained --decode_config conf/whisper/decode.yaml
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pqm_ext.asr.config import read_yaml
from pqm_ext.asr.layout import add_tag_argument, layout_of
from pqm_ext.asr.results import collect, plot_wer_vs_n, render_markdown
from pqm_ext.asr.score import CLEANERS, default_cleaner
from pqm_ext.data.kaldi_dir import read_data_dir
from pqm_ext.utils.fileio import atomic_file, write_text_atomic
from pqm_ext.utils.cli import entry_point


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp_dir", required=True)
    p.add_argument("--quant", default="nf4")
    p.add_argument("--baselines", nargs="*", default=["int4"])
    p.add_argument("--data", required=True)
    add_tag_argument(p)
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--nutts", nargs="*", type=int, default=[])
    p.add_argument("--inits", nargs="*", default=["scratch", "pretrained"])
    p.add_argument("--decode_config", required=True)
    p.add_argument("--score_cleaner", choices=CLEANERS, default=None,
                   help="text normalisation before scoring, of references and hypotheses alike: none (the "
                        "toolkit's: lower case, punctuation removed) or ESPnet's whisper_en / whisper_basic "
                        "cleaners (Whisper's normalisers; fair to an unadapted Whisper's orthography). "
                        "Default: whisper_en for --model whisper, none otherwise (as pqm.sh)")
    return p


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    cleaner = a.score_cleaner or default_cleaner(a.model)
    layout = layout_of(a)
    systems = layout.systems(a.nutts, a.inits, a.baselines)
    results = collect(layout, systems, read_data_dir(a.data), a.model, a.corpus, read_yaml(a.decode_config),
                      cleaner)
    write_text_atomic(layout.work / "results.json", json.dumps(results, indent=1))
    write_text_atomic(layout.work / "RESULTS.md", render_markdown(results))
    with atomic_file(layout.work / "wer_vs_n.png", "wb") as f:
        f.close()
        plot_wer_vs_n(results, Path(f.name))
    logging.info("wrote %s", layout.work / "RESULTS.md")


if __name__ == "__main__":
    main()

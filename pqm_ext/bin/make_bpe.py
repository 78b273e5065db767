"""Stage 3 for the Conformer: a sentencepiece unigram model and ESPnet's token list.

The model is trained on the pretraining pool's transcripts (sentencepiece); the token list is
written by ESPnet's ``tokenize_text`` with ESPnet's conventions: ``<blank>`` first, ``<unk>``
second, ``<sos/eos>`` last.

Usage:
    python -m pqm_ext.bin.make_bpe --text data/pretrain/text --nbpe 300 --out data/token_list/bpe_unigram300
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import atomic_dir
from pqm_ext.utils.cli import entry_point


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", required=True, help="Kaldi text file (utt transcript)")
    p.add_argument("--nbpe", type=int, default=300)
    p.add_argument("--out", required=True)
    return p


def make_bpe(text: Path, nbpe: int, out: Path) -> Path:
    import sentencepiece as spm
    from espnet2.bin.tokenize_text import tokenize

    text, out = Path(text), Path(out)
    if (out / "tokens.txt").is_file():
        logging.info("%s exists: skipping", out / "tokens.txt")
        return out
    if not text.is_file():
        raise InputError(text, "transcripts not found")
    with atomic_dir(out, overwrite=True) as tmp:
        sentences = tmp / "train.txt"
        with text.open(encoding="utf-8") as fin, sentences.open("w", encoding="utf-8") as fout:
            for line in fin:
                parts = line.rstrip("\n").split(maxsplit=1)
                if len(parts) == 2:
                    fout.write(parts[1] + "\n")
        spm.SentencePieceTrainer.train(input=str(sentences), model_prefix=str(tmp / "bpe"), vocab_size=nbpe,
                                       model_type="unigram", character_coverage=1.0, input_sentence_size=10**8,
                                       minloglevel=2)
        tokenize(input=str(text), output=str(tmp / "tokens.txt"), field="2-", delimiter=None, token_type="bpe",
                 space_symbol="<space>", non_linguistic_symbols=None, bpemodel=str(tmp / "bpe.model"),
                 log_level="INFO", write_vocabulary=True, vocabulary_size=0, remove_non_linguistic_symbols=False,
                 cutoff=0, add_symbol=["<blank>:0", "<unk>:1", "<sos/eos>:-1"], cleaner=None, g2p=None,
                 add_nonsplit_symbol=[])
        sentences.unlink()
    logging.info("wrote %s (%d tokens)", out, len((out / "tokens.txt").read_text().splitlines()))
    return out


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    make_bpe(a.text, a.nbpe, a.out)


if __name__ == "__main__":
    main()

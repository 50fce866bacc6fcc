#!/usr/bin/env python
"""Train a SentencePiece tokenizer with this project's special pieces.

Example (from the repository root, no install needed):

    python tools/train_tokenizer.py --input='text:data/austen/*.txt' \\
        --vocab_size=8000 --output=vocab/austen8k

writes vocab/austen8k.model and vocab/austen8k.vocab with the layout
pad=0 [PAD], unk=1 <unk>, bos=2 <s>, eos=3 </s>, then [CLS], [SEP], [MASK].
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence

try:
    import research  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from research import cli  # noqa: E402
from research.data.sources import open_documents  # noqa: E402
from research.data.tokenizer import train_sentencepiece  # noqa: E402
from research.errors import ConfigError  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog="train_tokenizer.py",
        description=__doc__,
        epilog="Input specs: 'text:GLOB' (blank-line separated documents), 'jsonl:GLOB' "
               "(one JSON object per line, see --text_field), 'tfds:NAME[/CONFIG][:SPLIT]' "
               "(an already prepared TFDS dataset). Quote globs so the shell leaves them.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="SPEC",
                        help="documents to train on, e.g. 'text:data/austen/*.txt'")
    parser.add_argument("--vocab_size", required=True, type=int, metavar="N",
                        help="total number of pieces, special pieces included")
    parser.add_argument("--output", required=True, metavar="PREFIX",
                        help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"),
                        help="SentencePiece algorithm (default: unigram)")
    parser.add_argument("--max_documents", type=int, default=None, metavar="N",
                        help="train on an evenly spaced sample of N documents (default: all)")
    parser.add_argument("--text_field", default="text",
                        help="JSON field (jsonl:) or TFDS feature (tfds:) with the text "
                             "(default: text)")
    parser.add_argument("--split", default=None, help="split to read (tfds: default 'train')")
    parser.add_argument("--data_dir", default=None,
                        help="cache for local files (default $RESEARCH_DATA_DIR or "
                             "~/.cache/research/tfds); for tfds: the TFDS data_dir")
    parser.add_argument("--character_coverage", type=float, default=1.0,
                        help="fraction of characters covered (default: 1.0; ~0.9995 for CJK)")
    parser.add_argument("--on_decode_error", default="strict", choices=("strict", "skip"),
                        help="invalid UTF-8 in local files: raise (default), or skip "
                             "those documents")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing PREFIX.model")
    args = parser.parse_args(argv)
    if args.vocab_size < 8:
        parser.error(f"--vocab_size={args.vocab_size} is too small: the 7 special pieces "
                     "alone need 7 ids; use a few hundred or more.")
    if args.max_documents is not None and args.max_documents < 1:
        parser.error("--max_documents must be >= 1.")
    return args


def sample_indices(n: int, max_documents: int | None) -> list[int]:
    """All of range(n), or `max_documents` evenly spaced indices of it."""
    if max_documents is None or max_documents >= n:
        return list(range(n))
    return [i * n // max_documents for i in range(max_documents)]


def training_lines(source, indices: list[int]) -> Iterator[str]:
    """Non-empty lines of the chosen documents (short lines stay under SentencePiece's
    per-sentence length limit, which silently drops longer sentences)."""
    for i in indices:
        for line in source[i].split("\n"):
            if line.strip():
                yield line.strip()


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model_path = args.output + ".model"
    if os.path.exists(model_path) and not args.overwrite:
        raise ConfigError(f"{model_path} already exists; pass --overwrite to replace it or "
                          "choose another --output.")
    cli.check_output_dir(os.path.dirname(args.output) or ".", "--output", args.output)
    source = open_documents(args.input, split=args.split, text_field=args.text_field,
                            data_dir=args.data_dir, on_decode_error=args.on_decode_error)
    indices = sample_indices(len(source), args.max_documents)
    print(f"Training {args.model_type} SentencePiece model, vocab_size={args.vocab_size}, on "
          f"{len(indices)} of {len(source)} documents from {source.name}.", flush=True)
    start = time.time()
    try:
        tok = train_sentencepiece(training_lines(source, indices), args.output,
                                  args.vocab_size, model_type=args.model_type,
                                  character_coverage=args.character_coverage)
    except RuntimeError as e:  # SentencePiece reports e.g. a vocab too large for the data
        raise ConfigError(f"SentencePiece training failed: {str(e).strip()}. If the vocabulary "
                          "is too large for this corpus, lower --vocab_size or add "
                          "documents.") from e
    print(f"Wrote {model_path} and {args.output}.vocab in {time.time() - start:.1f}s.")
    print(f"vocab_size: {tok.vocab_size}")
    print(f"special ids: pad={tok.pad_id} unk={tok.unk_id} bos={tok.bos_id} eos={tok.eos_id} "
          f"cls={tok.cls_id} sep={tok.sep_id} mask={tok.mask_id}")
    sample = next((d for d in (source[i] for i in indices[:50]) if len(d) >= 40),
                  source[indices[0]])
    sample = " ".join(sample.split())[:80]
    ids = tok.encode(sample)
    print(f"sample: {sample!r}")
    print(f"  pieces: {[tok.id_to_piece(i) for i in ids]}")
    print(f"  ids:    {ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

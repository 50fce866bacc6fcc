#!/usr/bin/env python
"""Tokenise a corpus once into token-id shards that a run trains from with `tokens:DIR`.

Example (from the repository root, no install needed):

    python tools/pretokenize.py --input='text:data/austen/*[!n].txt' \\
        --vocab=data/tokenizers/austen_8k.model --output=data/austen_tokens --workers=2

then train with --gin.TRAIN_DATA="'tokens:data/austen_tokens'" and the same VOCAB. DIR holds
tokens.json (document and token counts, dtype, the tokenizer's fingerprint), offsets.npy and
tokens-NNNNN.bin shards (research/data/tokens.py). The ids equal the tokenizer's own output
for every document, and the files are byte-identical for any --workers. A run whose VOCAB has
another fingerprint is refused. --output must be new or empty: nothing is overwritten.
--input, --vocab and --output may be object-store URLs (--output=gs://bkt/austen_tokens: each
shard is uploaded once written; train with TRAIN_DATA 'tokens:gs://bkt/austen_tokens').
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

try:
    import research  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from research import cli, storage  # noqa: E402
from research.data import token_writer  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog="pretokenize.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Input specs: any TRAIN_DATA document spec ('text:GLOB', 'jsonl:GLOB', "
               "'tfds:NAME[/CONFIG][:SPLIT]', ...). Quote globs so the shell leaves them.")
    parser.add_argument("--input", required=True, metavar="SPEC",
                        help="documents to tokenise, e.g. 'text:data/austen/*.txt'")
    parser.add_argument("--vocab", required=True, metavar="PATH",
                        help="the run's VOCAB: a SentencePiece .model or a WordPiece vocab.txt")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="new or empty directory for the token files (or a URL prefix, "
                             "e.g. gs://bkt/corpus)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="tokenising processes (default: the CPU count)")
    parser.add_argument("--text_field", default=None,
                        help="JSON field (jsonl:) or TFDS feature (tfds:) with the text "
                             "(default: open_documents' own, 'text')")
    parser.add_argument("--split", default=None, help="split to read (tfds: default 'train')")
    parser.add_argument("--data_dir", default=None,
                        help="cache for local files (default $RESEARCH_DATA_DIR or "
                             "~/.cache/research/tfds); for tfds: the TFDS data_dir")
    parser.add_argument("--shard_tokens", type=int, default=token_writer.SHARD_TOKENS,
                        metavar="N", help="start a new shard file after N tokens "
                                          f"(default {token_writer.SHARD_TOKENS})")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers={args.workers}: use 1 or more processes.")
    if args.shard_tokens < 1:
        parser.error(f"--shard_tokens={args.shard_tokens}: use 1 or more.")
    return args


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    token_writer.check_output(args.output)
    storage.check_writable(args.output, "--output")
    source_kwargs = {k: v for k, v in (("text_field", args.text_field), ("split", args.split),
                                                ("data_dir", args.data_dir))
                     if v is not None}
    meta = token_writer.write_token_files(
        args.input, args.vocab, args.output, workers=args.workers, source_kwargs=source_kwargs,
        shard_tokens=args.shard_tokens, progress=sys.stderr.isatty())
    seconds = meta["seconds"]
    print(f"Wrote {meta['num_documents']} documents, {meta['num_tokens']} tokens "
          f"({meta['dtype']}, {len(meta['shards'])} shard(s)) to {args.output} in "
          f"{seconds:.1f}s ({meta['num_tokens'] / max(seconds, 1e-9):,.0f} tokens/s, "
          f"{args.workers} worker(s)).")
    print(f"tokenizer fingerprint: {meta['tokenizer']['fingerprint']}")
    print(f"Train from it with --gin.TRAIN_DATA=\"'tokens:{args.output}'\" and "
          f"--gin.VOCAB=\"'{args.vocab}'\".")
    return 0


if __name__ == "__main__":
    sys.exit(main())

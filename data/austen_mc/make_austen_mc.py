"""Writes data/austen_mc/{train,validation}.jsonl: SWAG-style next-sentence multiple choice
derived from the bundled Austen novels (data/austen). Run from the repository root:

    python data/austen_mc/make_austen_mc.py

For two consecutive sentences of a paragraph, sent1 is the first, sent2 the first three words
of the second, and one of the four endings the rest of the second; the three distractors are
the rest of other sentences of the same novel (after their first three words), as SWAG's
wrong endings are plausible continuations drawn from elsewhere. Train: Pride and Prejudice and
Persuasion; validation: Emma. Deterministic (fixed seed), so reruns write the same files.
"""

from __future__ import annotations

import json
import pathlib
import random
import re

ROOT = pathlib.Path(__file__).resolve().parent
AUSTEN = ROOT.parent / "austen"
SPLITS = {"train": (("prideprejudice.txt", "persuasion.txt"), 600),
          "validation": (("emma.txt",), 200)}
SENTENCE_END = re.compile(r'(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<=[.!?])'
                          r'["\u201d]?\s+(?=["\u201c]?[A-Z])')
HEAD_WORDS = 3


def paragraphs(path: pathlib.Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)
            if p.strip() and not p.strip().startswith("Chapter")]


def sentence_pairs(novel: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(consecutive (sentence, next sentence) pairs, every sentence) of a novel, sentences of
    6 to 30 words only."""
    pairs, sentences = [], []
    for para in paragraphs(AUSTEN / novel):
        sents = [s for s in SENTENCE_END.split(para) if s]
        ok = [6 <= len(s.split()) <= 30 for s in sents]
        sentences += [s for s, good in zip(sents, ok) if good]
        pairs += [(a, b) for a, b, ga, gb in zip(sents, sents[1:], ok, ok[1:]) if ga and gb]
    return pairs, sentences


def examples(novels: tuple[str, ...], count: int, rng: random.Random) -> list[dict]:
    out = []
    per_novel = -(-count // len(novels))
    for novel in novels:
        pairs, sentences = sentence_pairs(novel)
        for first, second in rng.sample(pairs, per_novel):
            words = second.split()
            endings = [" ".join(words[HEAD_WORDS:])]
            while len(endings) < 4:
                other = " ".join(rng.choice(sentences).split()[HEAD_WORDS:])
                if other not in endings:
                    endings.append(other)
            label = rng.randrange(4)
            endings[0], endings[label] = endings[label], endings[0]
            out.append({"sent1": first, "sent2": " ".join(words[:HEAD_WORDS]),
                        **{f"ending{i}": e for i, e in enumerate(endings)}, "label": label,
                        "source": novel})
    return out[:count]


def main() -> None:
    rng = random.Random(17)
    for split, (novels, count) in SPLITS.items():
        rows = examples(novels, count, rng)
        path = ROOT / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
        print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()

"""Perplexity and bits per byte of a causal LM over a whole dataset, every token counted once.

The documents (any data spec: `text:GLOB`, `jsonl:GLOB`, `tokens:DIR`, ...) go through the
causal-LM data pipeline as training sees them (`research.data.causal_lm`, one row stream, no
shuffle, one pass): each document is the pair inputs = [BOS] + tokens, targets = tokens + [EOS],
and the documents are packed end to end into non-overlapping windows of `seq_len` tokens.
Every target is scored exactly once:

  - a document's first token is predicted from BOS, its EOS from its last token;
  - several documents in one window are separate segments (none sees another);
  - a document cut by a window boundary continues in the next window as a new segment: the
    first target there is predicted from its true previous token alone (positions restart
    at 0), with no earlier context. No window overlaps another, so a smaller --seq_len gives
    those tokens less context (a higher perplexity) but never counts one twice.

Windows are scored `batch_size` at a time (`research.evaluation.scoring.Scorer`).
Reported: `tokens` (targets, one EOS per document included), `nll` (their summed negative
log-likelihood, nats), `perplexity` = exp(nll / tokens), `bits_per_token`, and for text
sources `bytes` (the UTF-8 bytes of the documents) and `bits_per_byte` =
nll / ln 2 / bytes; token-id sources (`tokens:DIR`) have no text, so no bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from research.data.causal_lm import make_causal_lm_iterator
from research.data.sources import open_documents
from research.data.tokens import TokenSource
from research.evaluation.scoring import Scorer

READ_CHUNK = 1024  # documents read at a time when counting bytes


def count_bytes(source: Any) -> int | None:
    """UTF-8 bytes of every document of a text source; None for a token-id source."""
    if isinstance(source, TokenSource):
        return None
    total = 0
    for start in range(0, len(source), READ_CHUNK):
        docs = source.get_many(range(start, min(start + READ_CHUNK, len(source))))
        total += sum(len(d.encode("utf-8")) for d in docs)
    return total


def dataset_perplexity(scorer: Scorer, tokenizer: Any, spec: str, *, seq_len: int,
                       tokenize_workers: int | str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
    """Perplexity of the documents of `spec` (module docstring) in windows of `seq_len`
    (<= scorer.max_length). Returns a JSON-ready dict: data, documents, seq_len, tokens, nll,
    perplexity, bits_per_token, bytes, bits_per_byte (the last two None without text)."""
    source = open_documents(spec, data_dir=data_dir)
    stream = make_causal_lm_iterator(source, tokenizer, seq_len=seq_len, global_batch_size=1,
                                     seed=0, repeat=False, shuffle=False,
                                     tokenize_workers=tokenize_workers)
    nll, tokens = 0.0, 0

    def score(windows: list[dict[str, np.ndarray]]) -> None:
        nonlocal nll, tokens
        arrays = {k: np.concatenate([w[k] for w in windows]) for k in windows[0]}
        logp, _ = scorer.score_arrays(arrays["inputs"], arrays["targets"],
                                      arrays["segment_ids"], arrays["positions"])
        weights = arrays["weights"] > 0
        nll -= float(np.sum(logp[weights], dtype=np.float64))
        tokens += int(weights.sum())

    try:
        pending: list[dict[str, np.ndarray]] = []
        while True:
            window = next(stream)  # [1, seq_len] arrays: the one row stream's next window
            if window["weights"].any():
                pending.append(window)
            if len(pending) == scorer.batch_size:
                score(pending)
                pending = []
            if stream.exhausted:
                break
        if pending:
            score(pending)
    finally:
        stream.close()
    n_bytes = count_bytes(source)
    return {"data": spec, "documents": len(source), "seq_len": int(seq_len), "tokens": tokens,
            "nll": nll, "perplexity": math.exp(nll / tokens),
            "bits_per_token": nll / tokens / math.log(2), "bytes": n_bytes,
            "bits_per_byte": nll / n_bytes / math.log(2) if n_bytes else None}


def format_table(result: dict[str, Any]) -> str:
    """The result as a small Markdown table (as lm-eval prints its results)."""
    rows = [("data", result["data"]), ("documents", result["documents"]),
            ("seq_len", result["seq_len"]), ("tokens", result["tokens"]),
            ("bytes", result["bytes"] if result["bytes"] is not None else "n/a"),
            ("nll (nats)", f"{result['nll']:.4f}"),
            ("perplexity", f"{result['perplexity']:.4f}"),
            ("bits_per_token", f"{result['bits_per_token']:.4f}"),
            ("bits_per_byte", f"{result['bits_per_byte']:.4f}"
             if result["bits_per_byte"] is not None else "n/a")]
    width = max(len(k) for k, _ in rows)
    lines = [f"|{'metric':<{width}}|value|", f"|{'-' * width}|-----|"]
    return "\n".join(lines + [f"|{k:<{width}}|{v}|" for k, v in rows])

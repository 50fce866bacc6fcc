"""Evaluation of causal-LM checkpoints (`python -m research.evaluate`).

  scoring     per-token log-probabilities of many sequences: batched, bucketed, sharded
  lm_adapter  our model behind lm-evaluation-harness' LM interface (needs `lm-eval`)
  perplexity  perplexity and bits per byte of a whole dataset, every token counted once
"""

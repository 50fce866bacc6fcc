"""Autoregressive decoding with a KV cache, equal to Hugging Face `transformers`' `generate`.

  layout       the device mesh and logical-axis rules decoding runs under (`Layout`):
               parameters sharded like training, the KV cache over batch and kv heads
  cache        prompt prefill, one cached decode step, cache sharding and beam reordering
  sampling     greedy decoding and sampling (temperature, top-k, top-p), EOS stopping
  beam_search  beam search with HF's length penalty and `early_stopping` semantics
  stopping     stop sequences (`--stop=TEXT`): where a row's decoded text first holds one

`research.generate` is the entry point (Python API and CLI) that puts these together.
"""

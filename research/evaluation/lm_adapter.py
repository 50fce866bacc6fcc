"""Our causal LM behind lm-evaluation-harness' model interface (`lm_eval.api.model.LM`, through
its `TemplateLM`), so any of its tasks evaluates one of our checkpoints.

  loglikelihood          log p(continuation | context) summed over the continuation's tokens,
                         and whether every one of them is the greedy (argmax) choice
  loglikelihood_rolling  log p(text) with every token predicted once: lm-eval's disjoint
                         windows of `max_length` tokens (`get_rolling_token_windows`, context
                         length 1), the first conditioned on the prefix token
  generate_until         `research.generate.generate` (greedy unless the task samples), cut
                         at the task's `until` strings and at EOS

Tokens. A text is encoded with our tokenizer and, when it starts prompts with BOS (as
research.train's data does: inputs = [BOS] + tokens), the context gets BOS first; an empty
context is BOS alone (lm-eval's `prefix_token_id`; EOS for a tokenizer without BOS). A
context + continuation longer than max_length + 1 tokens loses its oldest context tokens,
as lm-eval's Hugging Face model does. Scoring is `research.evaluation.scoring.Scorer`:
batched, jitted once per bucket length, sharded over the layout's mesh.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from research.decoding import stopping
from research.decoding.layout import Layout
from research.errors import ConfigError
from research.evaluation.scoring import Scorer
from research.generate import generate
from research.models.transformer import CausalLM

DEFAULT_MAX_GEN_TOKS = 256


class ResearchLM(TemplateLM):
    """lm-eval model over a `CausalLM`, its `params` (placed by `layout.put_params`) and our
    tokenizer (`research.data.tokenizer.load_tokenizer`).

    Args:
      batch_size: requests per forward pass / generation batch.
      max_length: tokens per scoring window (default and at most the model's max_len).
      max_gen_toks: new tokens a generate_until request may take when its task names none.
      seed: sampling seed, for tasks that sample (do_sample / temperature > 0).
    """

    backend = "causal"

    def __init__(self, model: CausalLM, params: Any, tokenizer: Any, layout: Layout, *,
                 batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0):
        super().__init__()
        self.model, self.params, self.tok, self.layout = model, params, tokenizer, layout
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.cfg.max_len)
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self.scorer = Scorer(model, params, layout, batch_size=self.batch_size,
                             max_length=self._max_length, vocab_limit=tokenizer.vocab_size)
        self._bos = ([tokenizer.bos_id] if tokenizer.bos_id >= 0
                     and getattr(tokenizer, "add_bos_token", True) else [])
        if tokenizer.eos_id < 0 and not self._bos:
            raise ConfigError(f"tokenizer {tokenizer.path!r} has neither BOS nor EOS; lm-eval "
                              "needs one to condition an empty context on.")

    # ------------------------------------------------------------------ tokenizer

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._bos[0] if self._bos else self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        """Token ids of `string`, BOS first unless add_special_tokens is False."""
        ids = list(self.tok.encode(string))
        return ids if add_special_tokens is False else self._bos + ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(list(tokens))

    # --------------------------------------------------------------- log-likelihood

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) ->
        (sum of the continuation's log-probs, whether all its tokens are greedy)."""
        inputs, targets, counts = [], [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ConfigError("lm-eval asked for the log-likelihood of an empty "
                                  "continuation; check the task's doc_to_choice/target.")
            if len(continuation) > self.max_length:
                raise ConfigError(f"a continuation of {len(continuation)} tokens exceeds the "
                                  f"scoring window of {self.max_length} (--seq_len).")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs.append(whole[:-1])
            targets.append(whole[1:])
            counts.append(len(continuation))
        out = []
        scores = self.scorer.score(inputs, targets,
                                   progress=None if disable_tqdm else "scoring")
        for (key, _, _), (logp, greedy), n in zip(requests, scores, counts):
            answer = (float(np.sum(logp[-n:], dtype=np.float64)), bool(np.all(greedy[-n:])))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-probability, every token scored once (module docstring)."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = np.zeros(len(requests), np.float64)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logp
        out = [float(t) for t in totals]
        for request, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return out

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation text, cut before its first `until` string. Requests
        with the same generation kwargs share batches (sorted by context length)."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = [s for s in kwargs.pop("until") if s]
            max_new = int(kwargs.pop("max_gen_toks"))
            context_room = self.max_length - max_new
            if context_room < 1:
                raise ConfigError(f"the task asks for {max_new} new tokens, which leaves no "
                                  f"room for a context in the model's {self.max_length}.")
            sample = dict(temperature=float(kwargs.get("temperature", 0.0))
                          if kwargs.get("do_sample") else 0.0,
                          top_k=int(kwargs.get("top_k") or 0),
                          top_p=float(kwargs.get("top_p") or 1.0), seed=self.seed)
            prompts = {i: self.tok_encode(requests[i].args[0])[-context_room:] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            starts = range(0, len(order), self.batch_size)
            for start in tqdm(starts, desc="generating", disable=disable_tqdm, unit="batch"):
                chunk = order[start:start + self.batch_size]
                batch = [prompts[i] for i in chunk]
                # the batch filled to batch_size with copies of its first prompt: one shape
                batch += [batch[0]] * (self.batch_size - len(batch))
                rows = generate(self.model, self.params, batch, max_new_tokens=max_new,
                                eos_id=self.tok.eos_id, pad_id=self.tok.pad_id, stop=until,
                                decode=self.tok.decode, vocab_limit=self.tok.vocab_size,
                                layout=self.layout, **sample)
                for i, prompt, row in zip(chunk, batch, rows):
                    text = stopping.continuation(self.tok.decode, prompt, row)
                    out[i] = stopping.truncate(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

"""Sampling from an autoregressive checkpoint, with a KV cache.

  python -m research.generate --workdir=DIR --prompt="It is a truth" [--prompt=...]
      [--max_new_tokens=64] [--temperature=0.8] [--top_k=40] [--top_p=0.95] [--seed=0]

Prompts of different lengths are left-padded into one batch; padding is its own segment
(id 0), so real tokens never attend to it, and positions count real tokens only.
`temperature=0` is greedy decoding.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research import cli, logs, storage
from research import workdir as workdir_lib
from research.checkpoints.manager import Checkpointer
from research.data.tokenizer import load_tokenizer
from research.errors import ConfigError
from research.models.transformer import CausalLM, TransformerConfig

NOT_A_RUN = "--workdir must be a directory written by python -m research.train"


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns tokens int32[B, P] and segment ids int32[B, P] (1 = prompt token, 0 = padding)."""
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (the tokenizer's BOS is "
                          "prepended by the CLI, so pass text).")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, width - len(p):] = p
        segments[row, width - len(p):] = 1
    return tokens, segments


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
    """Draws one token per row from float logits [B, V]; temperature 0 means argmax."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        cutoff_index = jnp.sum(before < top_p, axis=-1, keepdims=True) - 1  # keep >= 1 token
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_id", "pad_id", "use_cache"))
def _generate(model: CausalLM, params, tokens, segments, rng, *, max_new_tokens: int,
              temperature: float, top_k: int, top_p: float, eos_id: int, pad_id: int,
              use_cache: bool):
    b, p = tokens.shape
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    last_pos = positions[:, -1]
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    if use_cache:
        cache_shapes = jax.eval_shape(
            lambda: model.init(jax.random.key(0), tokens[:, :1], decode=True)["cache"])
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)
        logits, mutated = model.apply({"params": params, "cache": cache}, tokens,
                                      segment_ids=segments, positions=positions, decode=True,
                                      mutable=["cache"])
        carry = (mutated["cache"], logits[:, -1], out, done, rng)

        def body(i, carry):
            cache, last_logits, out, done, rng = carry
            rng, draw = jax.random.split(rng)
            token = sample_logits(last_logits, draw, temperature, top_k, top_p)
            token = jnp.where(done, pad_id, token)
            out = out.at[:, i].set(token)
            done = done | (token == eos_id)
            logits, mutated = model.apply(
                {"params": params, "cache": cache}, token[:, None],
                segment_ids=jnp.ones((b, 1), jnp.int32), positions=(last_pos + 1 + i)[:, None],
                decode=True, mutable=["cache"])
            return mutated["cache"], logits[:, -1], out, done, rng

        _, _, out, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, carry)
        return out

    # Reference path without a cache: re-run the whole (growing) sequence every step.
    seq = jnp.concatenate([tokens, jnp.full((b, max_new_tokens), pad_id, jnp.int32)], axis=1)
    seg = jnp.concatenate([segments, jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)
    pos = jnp.concatenate([positions, last_pos[:, None] + 1 + jnp.arange(max_new_tokens)], axis=1)

    def body_nocache(i, carry):
        seq, out, done, rng = carry
        rng, draw = jax.random.split(rng)
        logits = model.apply({"params": params}, seq, segment_ids=seg, positions=pos)
        last_logits = jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False)
        token = sample_logits(last_logits, draw, temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token)
        seq = jax.lax.dynamic_update_slice(seq, token[:, None], (0, p + i))
        return seq, out.at[:, i].set(token), done | (token == eos_id), rng

    _, out, _, _ = jax.lax.fori_loop(0, max_new_tokens, body_nocache, (seq, out, done, rng))
    return out


def generate(model: CausalLM, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Continues each prompt (a list of token ids). Returns the new tokens of each row, cut
    after the first EOS (kept)."""
    tokens, segments = left_pad(prompts, pad_id)
    limit = model.cfg.max_len
    if tokens.shape[1] + max_new_tokens > limit:
        raise ConfigError(f"prompt ({tokens.shape[1]} tokens) + max_new_tokens "
                          f"({max_new_tokens}) exceeds the model's max_len {limit}; shorten one "
                          "of them.")
    out = _generate(model, params, jnp.asarray(tokens), jnp.asarray(segments),
                    jax.random.key(seed), max_new_tokens=max_new_tokens,
                    temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                    eos_id=int(eos_id), pad_id=int(pad_id), use_cache=use_cache)
    rows = []
    for row in np.asarray(out).tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return rows


def load_for_generation(workdir: str, step: int | None = None):
    """(model, params, tokenizer) from a training workdir's run.json and latest checkpoint (or
    `step`). ConfigError, before anything is written, if DIR is not a causal-LM run with that
    checkpoint."""
    info = workdir_lib.read_run_info(workdir)
    if info is None:
        problem = "does not exist" if not storage.isdir(workdir) else "has no readable run.json"
        raise ConfigError(f"--workdir={workdir} {problem}; {NOT_A_RUN} (it writes run.json "
                          "when training starts).")
    if info.get("objective") != "causal_lm":
        raise ConfigError(f"--workdir={workdir} holds a {info.get('objective')!r} model; "
                          "generation needs an autoregressive (causal_lm) checkpoint.")
    checkpoints = storage.join(workdir, "checkpoints")
    if not storage.isdir(checkpoints):  # Checkpointer would create it
        raise ConfigError(f"--workdir={workdir} has no checkpoints/ yet; train it until a "
                          "checkpoint is saved (train.checkpoint_every), or pick another run.")
    tokenizer = load_tokenizer(info["vocab"])
    model = CausalLM(TransformerConfig(**info["model_config"]))
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0),
                                                          jnp.zeros((1, 1), jnp.int32))["params"]))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    ckpt = Checkpointer(checkpoints, save_every=1, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps or (step is not None and step not in steps):
            wanted = f"no checkpoint at --step={step}" if steps else "no checkpoint"
            raise ConfigError(f"--workdir={workdir} has {wanted} (saved steps: "
                              f"{steps or 'none yet'}); pass one of them or leave --step out "
                              "for the latest.")
        params = ckpt.restore_params(step, abstract)
    finally:
        ckpt.close()
    return model, params, tokenizer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m research.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a causal-LM training workdir")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text (repeat for a batch of prompts)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0 = no top-k filtering")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus mass; 1.0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens={args.max_new_tokens} must be at least 1")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature and --top_k must be >= 0 and --top_p in (0, 1]")
    return args


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    logs.setup()
    args = parse_args(argv)
    model, params, tok = load_for_generation(args.workdir, args.step)
    prompts = [[tok.bos_id] + tok.encode(p) for p in args.prompt]
    rows = generate(model, params, prompts, max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id,
                    pad_id=tok.pad_id, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    for text, prompt, row in zip(args.prompt, prompts, rows):
        print(f"--- {text}\n{tok.decode(prompt + row)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Text generation from an autoregressive checkpoint: greedy, sampling or beam search, with a
KV cache, stop sequences and the model sharded over the devices.

  python -m research.generate --workdir=DIR --prompt="It is a truth" [--prompt=...]
      [--max_new_tokens=64] [--temperature=0.8] [--top_k=40] [--top_p=0.95] [--seed=0]
      [--num_beams=4 --length_penalty=1.0 --early_stopping=false]
      [--stop=TEXT ...] [--mesh_shape="{'tensor': -1}"] [--rules=PRESET] [--step=N]

Prompts of different lengths are left-padded into one batch; padding is its own segment
(id 0), so real tokens never attend to it, and positions count real tokens only.
`--temperature=0` is greedy decoding, token for token what Hugging Face `transformers`'
`generate(do_sample=False)` gives. `--num_beams=K` (K > 1) is HF's beam search
(`length_penalty` divides a finished hypothesis' summed log-probability by its generated
length ** length_penalty, EOS counted; `early_stopping` false (HF's default heuristic), true or
never); it is deterministic, so it takes no --temperature/--top_k/--top_p/--seed.

A row ends at the tokenizer's EOS, after --max_new_tokens, or once its generated text contains
a --stop string (repeatable); the text is printed cut before the stop.

The parameters are sharded over a mesh of all devices (`--mesh_shape`, axes data, fsdp,
tensor; default every device on `tensor`) by the run's logical-axis rules
(`logical_axis_rules.preset` in DIR/config.gin, fsdp_tensor by default, `--rules` to
override); the KV cache is sharded over batch (data x fsdp) and kv heads (tensor). A model
larger than one device thus generates; the tokens equal one device's (tested on 8 CPU devices).
"""

from __future__ import annotations

import argparse
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
from research.decoding import beam_search as beam_lib
from research.decoding import sampling, stopping
from research.decoding.cache import cache_sized, check_length, left_pad
from research.decoding.layout import Layout, mesh_shape_arg, run_rules
from research.decoding.sampling import sample_logits
from research.errors import ConfigError
from research.models.transformer import CausalLM, TransformerConfig
from research.training.partitioning import RULE_PRESETS

__all__ = ["generate", "left_pad", "load_for_generation", "main", "sample_logits"]

NOT_A_RUN = "--workdir must be a directory written by python -m research.train"
STOP_CHECK_EVERY = 8  # tokens generated between two host-side stop-string checks


def _cut_at_eos(row: list[int], eos_id: int) -> list[int]:
    return row[: row.index(eos_id) + 1] if eos_id in row else row


def generate(model: CausalLM, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False,
             stop: Sequence[str] = (), decode: stopping.Decode | None = None,
             vocab_limit: int | None = None, layout: Layout | None = None,
             use_cache: bool = True) -> list[list[int]]:
    """Continues each prompt (a list of token ids); returns the new tokens of each row.

    A row ends after its first EOS (kept), after `max_new_tokens`, or (with `stop` strings and
    `decode`, ids -> text) with the token that completes a stop string in its continuation
    (`research.decoding.stopping`; cut the text with `stopping.truncate`). Ids >= vocab_limit
    (the tokenizer's vocab_size; default the model's) are never generated. `num_beams` > 1 is
    beam search (deterministic: temperature, top_k, top_p and seed are not used; no `stop`).
    `layout` places the computation (default: the first device; `params` should already be
    placed by `layout.put_params`). `use_cache=False` is the cache-free reference (sampling
    only, one device, no vocab_limit).
    """
    if max_new_tokens < 1 or num_beams < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} and num_beams={num_beams} must be "
                          "at least 1.")
    tokens, segments = left_pad(prompts, pad_id)
    check_length(model, tokens.shape[1], max_new_tokens)
    model = cache_sized(model, tokens.shape[1] + max_new_tokens)
    if stop and (decode is None or num_beams > 1):
        raise ConfigError("stop strings need a decode function and work with greedy decoding "
                          "or sampling, not beam search (num_beams > 1).")
    if not use_cache:
        out = sampling.generate_without_cache(
            model, params, jnp.asarray(tokens), jnp.asarray(segments), jax.random.key(seed),
            max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
            top_p=float(top_p), eos_id=int(eos_id), pad_id=int(pad_id))
        return [_cut_at_eos(row, eos_id) for row in np.asarray(out).tolist()]
    layout = layout or Layout.single_device()
    vocab_limit = int(vocab_limit or model.cfg.vocab_size)
    with layout.context():
        tokens, segments = layout.batch(tokens), layout.batch(segments)
        if num_beams > 1:
            out, lengths, _ = beam_lib.beam_search(
                model, params, tokens, segments, num_beams=int(num_beams),
                max_new_tokens=max_new_tokens, eos_id=int(eos_id), pad_id=int(pad_id),
                length_penalty=float(length_penalty), early_stopping=early_stopping,
                layout=layout, vocab_limit=vocab_limit)
            return [row[:n] for row, n in zip(np.asarray(out).tolist(), np.asarray(lengths))]
        state = sampling.start(model, params, tokens, segments,
                               jax.random.key(seed), max_new_tokens=max_new_tokens,
                               pad_id=int(pad_id), vocab_limit=vocab_limit, layout=layout)
        kw = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                  eos_id=int(eos_id), pad_id=int(pad_id), vocab_limit=vocab_limit,
                  layout=layout)
        if not stop:
            state = sampling.run(model, params, state, max_new_tokens, **kw)
            return [_cut_at_eos(row, eos_id) for row in np.asarray(state.tokens).tolist()]
        return _run_with_stops(model, params, state, prompts, max_new_tokens, stop, decode,
                               eos_id, kw)


def _run_with_stops(model, params, state: sampling.State, prompts, max_new_tokens: int,
                    stop: Sequence[str], decode: stopping.Decode, eos_id: int,
                    kw: dict) -> list[list[int]]:
    """`sampling.run` in chunks of STOP_CHECK_EVERY tokens; between chunks, rows whose
    continuation holds a stop string are marked done (cut after the completing token)."""
    stopped_at: dict[int, int] = {}
    checked = 0
    while True:
        step = int(state.step)
        state = sampling.run(model, params, state, min(step + STOP_CHECK_EVERY, max_new_tokens),
                             **kw)
        step, rows = int(state.step), np.asarray(state.tokens).tolist()
        done = np.asarray(state.done).copy()
        for i, row in enumerate(rows):
            if i in stopped_at:
                continue
            new = _cut_at_eos(row[:step], eos_id)
            length = stopping.stop_length(decode, prompts[i], new, stop,
                                          start=min(checked, len(new)))
            if length >= 0:
                stopped_at[i], done[i] = length, True
        checked = step
        if step >= max_new_tokens or done.all():
            break
        state = state._replace(done=jax.device_put(done, state.done.sharding))
    return [row[:stopped_at[i]] if i in stopped_at else _cut_at_eos(row, eos_id)
            for i, row in enumerate(rows)]


def load_for_generation(workdir: str, step: int | None = None, layout: Layout | None = None):
    """(model, params, tokenizer) from a training workdir's run.json and latest checkpoint (or
    `step`), the parameters restored straight into `layout`'s shardings (default: the first
    device). ConfigError, before anything is written, if DIR is not a causal-LM run with that
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
    layout = layout or Layout.single_device()
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0),
                                                          jnp.zeros((1, 1), jnp.int32))["params"]))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, layout.param_shardings(model))
    return model, restore_workdir_params(workdir, step, abstract), tokenizer


def restore_workdir_params(workdir: str, step: int | None, abstract):
    """The parameters of DIR/checkpoints at `step` (None: the latest), restored straight into
    `abstract`'s shapes and shardings; ConfigError naming the saved steps if there is none."""
    ckpt = Checkpointer(storage.join(workdir, "checkpoints"), save_every=1, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps or (step is not None and step not in steps):
            wanted = f"no checkpoint at --step={step}" if steps else "no checkpoint"
            raise ConfigError(f"--workdir={workdir} has {wanted} (saved steps: "
                              f"{steps or 'none yet'}); pass one of them or leave --step out "
                              "for the latest.")
        return ckpt.restore_params(step, abstract)
    finally:
        ckpt.close()


def _early_stopping(text: str) -> bool | str:
    return {"false": False, "true": True, "never": "never"}[text]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m research.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a causal-LM training workdir (or a "
                        "converted checkpoint: tools/convert_checkpoint.py --from_hf)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text (repeat for a batch of prompts)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (default 1.0: sampling)")
    parser.add_argument("--top_k", type=int, default=None, help="0 = no top-k filtering")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus mass; 1.0 = off")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    parser.add_argument("--num_beams", type=int, default=1,
                        help="> 1: beam search (Hugging Face's), deterministic")
    parser.add_argument("--length_penalty", type=float, default=1.0,
                        help="beam search: finished score = sum log p / length ** this")
    parser.add_argument("--early_stopping", type=str.lower, default="false",
                        choices=("false", "true", "never"),
                        help="beam search's stopping rule, as Hugging Face's (default false)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end a row once its text contains TEXT; the output is cut before "
                             "it (repeatable; greedy or sampling)")
    parser.add_argument("--mesh_shape", type=mesh_shape_arg, default={"tensor": -1},
                        help="devices mesh, axes data/fsdp/tensor (default \"{'tensor': -1}\": "
                             "every device on tensor)")
    parser.add_argument("--rules", choices=sorted(RULE_PRESETS), default=None,
                        help="logical-axis rules preset (default: the run's config.gin, "
                             "else fsdp_tensor)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens={args.max_new_tokens} must be at least 1")
    sampling_flags = [f"--{name}" for name in ("temperature", "top_k", "top_p", "seed")
                      if getattr(args, name) is not None]
    if args.num_beams < 1:
        parser.error(f"--num_beams={args.num_beams} must be at least 1")
    if args.num_beams > 1 and (sampling_flags or args.stop):
        parser.error(f"--num_beams={args.num_beams} is deterministic beam search; drop "
                     f"{' '.join(sampling_flags + ['--stop'] * bool(args.stop))} (or use "
                     "--num_beams=1)")
    for name, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("seed", 0)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature and --top_k must be >= 0 and --top_p in (0, 1]")
    if not all(args.stop):
        parser.error("--stop needs a non-empty TEXT")
    args.early_stopping = _early_stopping(args.early_stopping)
    return args


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    logs.setup()
    args = parse_args(argv)
    layout = Layout.create(args.mesh_shape, run_rules(args.workdir, args.rules))
    model, params, tok = load_for_generation(args.workdir, args.step, layout)
    bos = [tok.bos_id] if tok.bos_id >= 0 else []
    prompts = [bos + tok.encode(p) for p in args.prompt]
    rows = generate(model, params, prompts, max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id,
                    pad_id=tok.pad_id, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, num_beams=args.num_beams,
                    length_penalty=args.length_penalty, early_stopping=args.early_stopping,
                    stop=args.stop, decode=tok.decode, vocab_limit=tok.vocab_size, layout=layout)
    for text, prompt, row in zip(args.prompt, prompts, rows):
        new = stopping.truncate(stopping.continuation(tok.decode, prompt, row), args.stop)
        print(f"--- {text}\n{tok.decode(prompt)}{new}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluates a causal-LM checkpoint: lm-evaluation-harness tasks, or perplexity over a dataset.

  python -m research.evaluate --workdir=DIR --tasks=T1,T2 [--include_path=DIR]
      [--num_fewshot=K] [--limit=N] [--batch_size=B] [--output=FILE]
  python -m research.evaluate --workdir=DIR --data=SPEC [--seq_len=L] [--batch_size=B]
      [--output=FILE]

--tasks runs lm-evaluation-harness (the `lm-eval` package: pip install -e .[eval]) with our
model behind its LM interface (research.evaluation.lm_adapter: loglikelihood,
loglikelihood_rolling, generate_until; batched, jitted per bucket length, sharded over the
mesh) and prints its results table; --output writes its results JSON. Task names are
lm-eval's, or those of the task YAMLs under --include_path (e.g. `dataset_path: json` with
`dataset_kwargs: {data_files: ...}` reads local json/jsonl files; set HF_DATASETS_OFFLINE=1
to forbid downloads). When every task is found under --include_path, lm-eval's own task
index (thousands of YAMLs) is not scanned.

--data=SPEC (a data spec as training takes: text:GLOB, jsonl:GLOB, parquet:GLOB, tokens:DIR,
tfds:NAME) computes the perplexity and bits per byte of the whole dataset, every token counted
once in non-overlapping windows of --seq_len tokens (research.evaluation.perplexity: a
document cut by a window boundary continues in the next window from its true previous token,
with no earlier context).

--seq_len (default the model's max_len) is the scoring window of both modes; pass it for a
model with a long rotary max_len. The parameters are sharded over a mesh of all devices
(`--mesh_shape`, `--rules`, as research.generate).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from research import cli, logs, storage
from research.decoding.layout import Layout, run_rules
from research.errors import ConfigError
from research.evaluation.perplexity import dataset_perplexity, format_table
from research.evaluation.scoring import Scorer
from research.training.partitioning import RULE_PRESETS

# research.generate (and the lm-eval adapter) import Orbax, whose import-time absl log call
# gives the root logger a second handler unless logs.setup() ran first: imported in main().

NO_LM_EVAL = ("--tasks needs lm-evaluation-harness: pip install -e '.[eval]' (or "
              "pip install 'lm-eval>=0.4.13,<0.5').")


def _limit(text: str) -> int | float:
    """--limit: an int (examples per task) or a fraction in (0, 1)."""
    value = float(text)
    if value <= 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive count or a fraction "
                                         "in (0, 1)")
    return int(value) if value >= 1 else value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from research.decoding.layout import mesh_shape_arg
    parser = cli.ArgumentParser(prog="python -m research.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a causal-LM training workdir (or a "
                        "converted checkpoint: tools/convert_checkpoint.py --from_hf)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--tasks", help="comma-separated lm-eval task (or group) names")
    what.add_argument("--data", metavar="SPEC", help="perplexity over this whole dataset")
    parser.add_argument("--include_path", action="append", default=[], metavar="DIR",
                        help="a directory of extra lm-eval task YAMLs (repeatable)")
    parser.add_argument("--num_fewshot", type=int, default=None,
                        help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="examples per task (or a fraction < 1); for quick checks only")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per forward pass")
    parser.add_argument("--seq_len", type=int, default=None,
                        help="tokens per scoring window (default: the model's max_len)")
    parser.add_argument("--max_gen_toks", type=int, default=256,
                        help="new tokens of a generate_until task that sets no max_gen_toks")
    parser.add_argument("--seed", type=int, default=0, help="seed of tasks that sample")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="write the results JSON here")
    parser.add_argument("--mesh_shape", type=mesh_shape_arg, default={"tensor": -1},
                        help="devices mesh, axes data/fsdp/tensor (default \"{'tensor': -1}\")")
    parser.add_argument("--rules", choices=sorted(RULE_PRESETS), default=None,
                        help="logical-axis rules preset (default: the run's config.gin)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "seq_len", "max_gen_toks"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag}={value} must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        parser.error(f"--num_fewshot={args.num_fewshot} must be >= 0")
    if args.data is not None:
        used = [f"--{n}" for n in ("include_path", "num_fewshot", "limit")
                if getattr(args, n) not in (None, [])]
        if used:
            parser.error(f"{' '.join(used)}: only for --tasks, not --data")
    if args.tasks is not None:
        args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not args.tasks:
            parser.error("--tasks needs at least one task name")
    return args


def task_manager(tasks: list[str], include_paths: list[str]):
    """An lm-eval TaskManager that knows `tasks`: only the --include_path YAMLs when they
    define every one (fast), else lm-eval's whole index too. ConfigError naming unknown ones."""
    from lm_eval.tasks import TaskManager
    for path in include_paths:
        if not os.path.isdir(path):
            raise ConfigError(f"--include_path={path} is not a directory of task YAMLs.")
    paths = include_paths or None
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}; `lm-eval ls tasks` "
                          "lists lm-eval's, or point --include_path at a directory of task "
                          "YAMLs that define them.")
    return manager


def run_tasks(lm: Any, manager: Any, args: argparse.Namespace) -> dict[str, Any]:
    """lm-eval's simple_evaluate over args.tasks; prints its tables. Returns its results."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table
    logging.getLogger("datasets").setLevel(logging.WARNING)  # "TensorFlow version available"
    results = simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot,
                              limit=args.limit, batch_size=args.batch_size,
                              task_manager=manager, log_samples=False,
                              random_seed=args.seed, numpy_random_seed=args.seed,
                              torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    print(f"{args.workdir} (step {args.step if args.step is not None else 'latest'}), "
          f"limit: {args.limit}, num_fewshot: {args.num_fewshot}, "
          f"batch_size: {args.batch_size}")
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return results


def write_json(path: str, payload: dict[str, Any]) -> None:
    """`payload` as indented JSON at `path` (a local path or an object-store URL)."""
    def default(o):
        from lm_eval.utils import handle_non_serializable
        return handle_non_serializable(o)
    storage.makedirs(storage.dirname(path))
    storage.write_text(path, json.dumps(payload, indent=2, default=default) + "\n")


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    logs.setup()
    args = parse_args(argv)
    if args.output:
        cli.check_output_dir(storage.dirname(args.output), "--output", args.output)
    manager = None
    if args.tasks is not None:
        try:
            from research.evaluation.lm_adapter import ResearchLM
        except ImportError as err:
            raise ConfigError(f"{NO_LM_EVAL} ({err})") from err
        manager = task_manager(args.tasks, args.include_path)
    from research.generate import load_for_generation
    layout = Layout.create(args.mesh_shape, run_rules(args.workdir, args.rules))
    model, params, tok = load_for_generation(args.workdir, args.step, layout)
    seq_len = args.seq_len or model.cfg.max_len
    if args.tasks is not None:
        lm = ResearchLM(model, params, tok, layout, batch_size=args.batch_size,
                        max_length=seq_len, max_gen_toks=args.max_gen_toks, seed=args.seed)
        payload = run_tasks(lm, manager, args)
    else:
        scorer = Scorer(model, params, layout, batch_size=args.batch_size, max_length=seq_len,
                        vocab_limit=tok.vocab_size)
        payload = {"workdir": args.workdir, "step": args.step,
                   **dataset_perplexity(scorer, tok, args.data, seq_len=seq_len)}
        print(format_table(payload))
    if args.output:
        write_json(args.output, payload)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert Hugging Face checkpoints (BERT, GPT-2, Llama, Mistral, Qwen2, Gemma) to this
project's format, and back.

Import (HF -> ours), from a directory with config.json + model.safetensors (or sharded
model-0000i-of-0000N.safetensors + model.safetensors.index.json):

    python tools/convert_checkpoint.py --from_hf=hf/bert-base-uncased --to=ckpt/bert_base

writes ckpt/bert_base/checkpoints/0/params (Orbax), model.gin (TransformerConfig bindings)
and run.json (model_config, objective, vocab = the HF directory's tokenizer file:
vocab.txt, tokenizer.json, tokenizer.model, ...). Use it as
`--gin_file=ckpt/bert_base/model.gin --gin.INIT_CHECKPOINT="'ckpt/bert_base'"` with a
fine-tuning or pretraining run config; `--gin.VOCAB=None` takes the checkpoint's tokenizer.

Export (ours -> HF), from a training workdir or a converted directory:

    python tools/convert_checkpoint.py --from=runs/bert_mini --to_hf=hf/bert_mini

writes config.json + model.safetensors (sharded past --max_shard_size) with HF key names
(BertForPreTraining for BERT pretraining params, BertForSequenceClassification for fine-tuned
ones, LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / GemmaForCausalLM for
Llama-style causal LMs, GPT2LMHeadModel for the others) and the run's tokenizer files.

Every directory may also be an object-store URL, e.g. --from_hf=gs://bkt/hf/bert-base-uncased
--to=gs://bkt/ckpt/bert_base.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence

try:
    import research  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from research import cli, storage  # noqa: E402
from research.checkpoints.hf import convert as hf_convert  # noqa: E402


_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10,
          "MIB": 2 ** 20, "GIB": 2 ** 30}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000' -> bytes (decimal units, as transformers)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 5GB, 500MB or a "
                                         f"number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from_hf", metavar="DIR",
                        help="Hugging Face checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--to", metavar="OUT", help="output directory for --from_hf")
    parser.add_argument("--from", dest="from_ours", metavar="WORKDIR",
                        help="our training workdir, converted directory, or one step's folder")
    parser.add_argument("--to_hf", metavar="DIR", help="output directory for --from")
    parser.add_argument("--scan_layers", action="store_true",
                        help="import: store the layers stacked (TransformerConfig.scan_layers)")
    parser.add_argument("--max_shard_size", type=parse_size, default="5GB", metavar="SIZE",
                        help="export: largest safetensors file, e.g. 5GB, 500MB or bytes "
                             "(default 5GB, as transformers); larger weights are sharded")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing checkpoint / model.safetensors in the output")
    args = parser.parse_args(argv)
    importing = args.from_hf is not None or args.to is not None
    exporting = args.from_ours is not None or args.to_hf is not None
    if importing == exporting:
        parser.error("give either --from_hf=DIR --to=OUT (import) or --from=WORKDIR --to_hf=DIR "
                     "(export).")
    if importing and not (args.from_hf and args.to):
        parser.error("import needs both --from_hf=DIR and --to=OUT.")
    if exporting and not (args.from_ours and args.to_hf):
        parser.error("export needs both --from=WORKDIR and --to_hf=DIR.")
    if exporting and args.scan_layers:
        parser.error("--scan_layers applies to import; export reads the layout from run.json.")
    return args


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    if args.from_hf:
        storage.check_writable(args.to, "--to")
        converted = hf_convert.convert_from_hf(args.from_hf, args.to, scan_layers=args.scan_layers,
                                               overwrite=args.overwrite)
        cfg = converted.cfg
        print(f"Converted HF {converted.model_type} ({cfg.num_layers} layers, d_model "
              f"{cfg.d_model}, vocab {cfg.vocab_size}, {len(converted.params)} tensors, "
              f"objective {converted.objective}) to {args.to} in {time.time() - start:.1f}s.")
        vocab = " --gin.VOCAB=None" if converted.objective == "causal_lm" else ""
        print(f"Use: --gin_file={storage.join(args.to, 'model.gin')} --gin_file=RUN_CONFIG "
              f"--gin.INIT_CHECKPOINT=\"'{args.to}'\"{vocab}")
    else:
        storage.check_writable(args.to_hf, "--to_hf")
        config = hf_convert.convert_to_hf(args.from_ours, args.to_hf, overwrite=args.overwrite,
                                          max_shard_size=args.max_shard_size)
        print(f"Wrote {config['architectures'][0]} ({config['model_type']}) to {args.to_hf} "
              f"in {time.time() - start:.1f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

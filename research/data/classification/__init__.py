"""Sentence and sentence-pair classification / regression data for fine-tuning.

    ex = load_examples('tsv:data/rotten_tomatoes/train.tsv')           # columns label, text
    ex = load_examples('csv:mrpc/*.csv', text_fields=('text_a', 'text_b'))
    ex = load_examples('jsonl:nli/dev.jsonl', text_fields=('premise', 'hypothesis'),
                       label_names=train.label_names)
    ex = load_examples('tfds:glue/stsb:validation', text_fields=('sentence1', 'sentence2'),
                       regression=True)
    it = make_classification_iterator(ex, tokenizer, seq_len=128, global_batch_size=32, seed=0)

Modules, in data-flow order: `readers` (spec -> raw rows), `labels` (raw labels -> ids or
targets), `examples` (`Examples`, `load_examples`), `encoding` (texts -> token ids with
special tokens), `iterator` (batches).

Specs. `tsv:PATH` (tab separated, no quoting), `csv:PATH` (comma separated, `"` quoting as
written by Python's csv module / spreadsheets) -- the first row of each file names the
columns; `jsonl:PATH` -- one JSON object per line; `tfds:NAME[/CONFIG][:VERSION][:SPLIT]` --
a TFDS dataset already prepared in `data_dir` (never downloaded). PATH may be a glob
(`**` recursive); the matching files are concatenated in sorted path order.

Labels (classification). A label that is an integer (JSON/TFDS int, an integral float, or
a string such as "1") is the class id as-is. Any other string is a class *name*: it is
mapped through `label_names` (index = id) when given, otherwise through the sorted list of
the distinct string labels of the files being loaded, which becomes `Examples.label_names`.
So load the train split first and pass its `label_names` to eval/test splits, or their ids
may disagree. When `label_names` is given, a string found in it is always looked up there
(even "1"). TFDS `ClassLabel` features supply their names. An empty / missing label, a NaN,
or the integer -1 (GLUE's test splits) means "unlabeled": allowed only with
`allow_unlabeled=True`, and stored as -1 (classification) or NaN (regression).

Labels (regression, `regression=True`). Parsed as float32.

Batches (`make_classification_iterator`). The global batch of B rows holds the next B
positions of the concatenation over epochs e = 0, 1, ... of the example order
`np.random.default_rng([seed, e]).permutation(N)` (identity without shuffle). Host p of P
yields rows [p*B/P, (p+1)*B/P) and tokenises only those, so the concatenation of the host
batches equals the P=1 batch for any P. The state is the number of batches yielded, so it
can even be restored under a different process count.
"""

from research.data.classification.encoding import TokenizerLike, encode_example, truncate_lengths
from research.data.classification.examples import Examples, load_examples
from research.data.classification.iterator import (ClassificationIterator, epoch_steps,
                                                   make_classification_iterator)
from research.data.local_builder import DataSourceError

__all__ = ["DataSourceError", "Examples", "load_examples", "encode_example",
           "truncate_lengths", "TokenizerLike", "ClassificationIterator",
           "make_classification_iterator", "epoch_steps"]

"""Word-tagged sentences in CoNLL column format (NER, POS, chunking): the `conll:PATH` spec.

    train = load_conll('conll:data/conll2000_chunking/train.conll')
    dev = load_conll('conll:data/conll2000_chunking/validation.conll',
                     label_names=train.label_names)

Format. One word per line in whitespace- or tab-separated columns: the first column is the
word, the last one its label (columns between, e.g. POS tags, are ignored); a blank line ends
a sentence; lines whose first column is `-DOCSTART-` (CoNLL-2003 document markers) are
skipped and also end a sentence. A line with a single column is a word without a label
(allowed in test files, `allow_unlabeled`). PATH may be a glob or an object-store URL
(`gs://...`, through `research.storage`); matching files are read in sorted path order.

Labels are strings (tags such as `B-PER`, `NN`, `I-NP`). Their ids index `label_names`: given
(the training split's, for eval / test splits), or else the sorted distinct labels of the
files being loaded, so the training split fixes the vocabulary and the order is stable.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import numpy as np

from research.data.classification.readers import _open_text
from research.data.local_builder import DataSourceError
from research.data.sources import expand_glob

log = logging.getLogger(__name__)

PREFIX = "conll"
DOCSTART = "-DOCSTART-"
UNLABELED = -1


@dataclasses.dataclass
class TaggedSentences:
    """A loaded token-classification split.

    Attributes:
      words: N sentences, each a tuple of its words.
      labels: N int64 arrays, one label id per word (-1: unlabeled word).
      label_names: label strings, index = id.
      name: the spec the sentences came from (and the file count for globs).
    """

    words: list[tuple[str, ...]]
    labels: list[np.ndarray]
    label_names: list[str]
    name: str

    def __post_init__(self):
        if len(self.words) != len(self.labels) or any(
                len(w) != len(lab) for w, lab in zip(self.words, self.labels)):
            raise ValueError(f"TaggedSentences {self.name!r}: words and labels must align one "
                             "to one, sentence by sentence and word by word.")

    def __len__(self) -> int:
        return len(self.words)

    @functools.cached_property
    def texts(self) -> list[tuple[str]]:
        """Each sentence as one text (its words joined by spaces), as `Examples.texts`."""
        return [(" ".join(w),) for w in self.words]

    @property
    def num_words(self) -> int:
        return sum(len(w) for w in self.words)

    def __repr__(self) -> str:
        return (f"<TaggedSentences {self.name}: {len(self)} sentences, {self.num_words} words, "
                f"{len(self.label_names)} labels>")


def parse_conll(lines, path: str) -> list[tuple[list[str], list[str | None], list[int]]]:
    """Sentences of one file's lines: (words, raw labels (None: no label column), line
    numbers). See the module docstring for the format."""
    sentences, words, labels, where = [], [], [], []

    def flush():
        if words:
            sentences.append((list(words), list(labels), list(where)))
        for part in (words, labels, where):
            part.clear()

    for lineno, line in enumerate(lines, start=1):
        cols = line.split()
        if not cols or cols[0] == DOCSTART:
            flush()
            continue
        words.append(cols[0])
        labels.append(cols[-1] if len(cols) > 1 else None)
        where.append(lineno)
    flush()
    return sentences


def _read_file(path: str) -> list[tuple[list[str], list[str | None], list[int]]]:
    try:
        with _open_text(path) as f:
            sentences = parse_conll(f, path)
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{path}: invalid UTF-8 ({e.reason} at byte offset {e.start} of "
                              "a read chunk). Re-encode the file as UTF-8.") from e
    except OSError as e:
        raise DataSourceError(f"Cannot read {path}: {e}.") from e
    if not sentences:
        raise DataSourceError(f"{path} has no sentences (one 'word ... label' line per word, "
                              "a blank line between sentences). Fix it or remove it from the "
                              "glob.")
    return sentences


def load_conll(spec: str, *, label_names: Sequence[str] | None = None,
               allow_unlabeled: bool = False) -> TaggedSentences:
    """Loads the sentences of `spec` = 'conll:PATH' (see the module docstring).

    Args:
      spec: 'conll:PATH', PATH a file, a glob or a gs:// URL.
      label_names: the label vocabulary (index = id), e.g. the training split's; None = the
        sorted distinct labels found in these files.
      allow_unlabeled: accept words without a label column (test files); they get id -1.

    Raises:
      DataSourceError: another spec, no matching file, an unreadable or empty file, a word
        without a label (unless allow_unlabeled), a label not in label_names.
    """
    prefix, sep, rest = spec.partition(":")
    if prefix != PREFIX or not sep or not rest:
        raise DataSourceError(
            f"Unknown token-classification data spec {spec!r}. Use 'conll:PATH' (one 'word "
            "... label' line per word, a blank line between sentences; PATH may be a glob).")
    paths = expand_glob(rest, PREFIX)
    raw = [(path, s) for path in paths for s in _read_file(path)]
    found = sorted({lab for _, (_, labs, _) in raw for lab in labs if lab is not None})
    if label_names is None:
        names = found
        log.info("Label names from %s (sorted; pass them to the other splits): %s", spec, names)
    else:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names):
            raise DataSourceError(f"label_names {names} has duplicates; each label must appear "
                                  "once (index = id).")
    lookup = {n: i for i, n in enumerate(names)}
    words, labels = [], []
    for path, (ws, labs, where) in raw:
        ids = np.full(len(ws), UNLABELED, np.int64)
        for i, lab in enumerate(labs):
            if lab is None:
                if not allow_unlabeled:
                    raise DataSourceError(
                        f"{path}, line {where[i]}: the word {ws[i]!r} has no label column. Give "
                        "every word its label in the last column (an unlabeled test file may "
                        "hold the words alone).")
                continue
            if lab not in lookup:
                raise DataSourceError(
                    f"{path}, line {where[i]}: label {lab!r} is not among the training labels "
                    f"{names}. Fix the row, or pin the vocabulary with "
                    "TokenClassificationObjective.label_names.")
            ids[i] = lookup[lab]
        words.append(tuple(ws))
        labels.append(ids)
    name = spec if len(paths) == 1 else f"{spec} ({len(paths)} files)"
    out = TaggedSentences(words, labels, names, name)
    log.info("Loaded %r.", out)
    return out

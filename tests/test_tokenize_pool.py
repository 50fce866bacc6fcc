"""Tokenize workers of the causal-LM text iterator (research/data/tokenize_pool.py): the
batches and resume states are those of in-process tokenisation, worker errors surface, and
close() leaves no worker process behind."""

import os
import pickle
import shutil
import signal
import time

import numpy as np
import pytest
from tests.conftest import ROOT, austen_paragraphs

from research.data import tokenize_pool
from research.data.causal_lm import make_causal_lm_iterator
from research.data.tokenizer import load_tokenizer
from research.data.tokenize_pool import TokenizeWorkerError
from research.errors import ConfigError

VOCAB = str(ROOT / "data" / "tokenizers" / "austen_8k.model")
DOCS = austen_paragraphs(60)  # ~150 documents per 25 batches below: the order wraps twice
LAYOUT = dict(seq_len=128, global_batch_size=4, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def reference(tokenizer):
    """25 in-process batches (workers=0) and the state after each."""
    it = make_causal_lm_iterator(DOCS, tokenizer, tokenize_workers=0, prefetch=0, **LAYOUT)
    batches, states = [], []
    for _ in range(25):
        batches.append(next(it))
        states.append(it.get_state())
    assert it.feed.documents_from_workers == 0
    return batches, states


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _assert_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def test_workers_give_the_in_process_batches_and_close_leaves_no_process(tokenizer, reference):
    batches, states = reference
    it = make_causal_lm_iterator(DOCS, tokenizer, tokenize_workers=2, **LAYOUT)
    assert it.feed.start(wait=True)  # from here every document comes from a worker
    pids = it.feed._executor.pids
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    got = [next(it) for _ in range(12)]
    assert it.feed.documents_in_process == 0
    assert it.feed.documents_from_workers > len(DOCS)  # past an epoch wrap
    it.close()  # stops the workers and rewinds the prefetched batches ...
    assert not it.feed.running and not any(_alive(p) for p in pids)
    got += [next(it) for _ in range(13)]  # ... which come again from a restarted pool
    _assert_equal(got, batches)
    assert it.get_state() == states[-1]
    assert it.feed.documents_from_workers + it.feed.documents_in_process > 2 * len(DOCS)
    pids = it.feed._executor.pids
    it.close()
    assert not it.feed.running and not any(_alive(p) for p in pids)


def test_eval_pass_with_workers(tokenizer):
    """repeat=False: rows run out at the end of one pass (chunks stop there), then padding."""
    def run(workers):
        it = make_causal_lm_iterator(DOCS, tokenizer, tokenize_workers=workers, repeat=False,
                                     prefetch=0, **LAYOUT)
        if workers:
            assert it.feed.start(wait=True)
        out = []
        while not it.exhausted:
            out.append(next(it))
        out.append(next(it))  # all padding
        it.close()
        return out, it.feed.documents_in_process
    want, _ = run(0)
    got, in_process = run(1)
    _assert_equal(got, want)
    assert in_process == 0 and not want[-1]["weights"].any()


def test_resume_with_workers_and_multi_host_split(tokenizer, reference):
    """Two hosts (process_count=2, one worker each) restored from the merged state after batch
    9 give the halves of the uninterrupted single-process batches 10..24."""
    batches, states = reference
    hosts = [make_causal_lm_iterator(DOCS, tokenizer, tokenize_workers=1, process_index=p,
                                     process_count=2, **LAYOUT) for p in range(2)]
    for host in hosts:
        host.set_state(states[9])
        assert host.feed.start(wait=True)
    got = [{key: np.concatenate([h[key] for h in pair])
            for key in pair[0]} for pair in zip(*[[next(h) for _ in range(15)] for h in hosts])]
    _assert_equal(got, batches[10:])
    pids = [pid for host in hosts for pid in host.feed._executor.pids]
    for host in hosts:
        assert host.feed.documents_in_process == 0
        host.close()
    assert not any(_alive(p) for p in pids)


def test_worker_error_surfaces(tokenizer, tmp_path):
    """A worker that cannot load the tokenizer (its file is gone) is one clear error in the
    parent, through the prefetch thread; the workers are gone afterwards."""
    vocab = str(tmp_path / "gone.model")
    shutil.copy(VOCAB, vocab)
    tok = load_tokenizer(vocab)
    os.remove(vocab)
    it = make_causal_lm_iterator(DOCS, tok, tokenize_workers=1, **LAYOUT)
    deadline = time.monotonic() + 60
    with pytest.raises(RuntimeError) as info:
        while time.monotonic() < deadline:  # in-process until the worker answers, then fails
            next(it)
    cause = info.value.__cause__
    assert isinstance(cause, TokenizeWorkerError), info.value
    assert "VocabNotFoundError" in str(cause) and "gone.model" in str(cause)
    assert "documents [" in str(cause)
    assert not it.feed.running
    it.close()


def test_settings_and_auto_start(tokenizer, monkeypatch):
    for bad in (-1, 1.5, "two", True):
        with pytest.raises(ConfigError, match="tokenize workers"):
            tokenize_pool.resolve_workers(bad)
    assert tokenize_pool.resolve_workers(3) == (3, 0.0)
    monkeypatch.setattr(tokenize_pool, "usable_cpus", lambda: 2)
    assert tokenize_pool.resolve_workers("auto") == (2, tokenize_pool.AUTO_START_S)
    monkeypatch.setattr(tokenize_pool, "usable_cpus", lambda: 1)
    assert tokenize_pool.resolve_workers("auto") == (0, 0.0)
    # 'auto' (the default) starts no worker before AUTO_START_S of in-process tokenising.
    it = make_causal_lm_iterator(DOCS, tokenizer, prefetch=0, **LAYOUT)
    monkeypatch.setattr(tokenize_pool, "usable_cpus", lambda: 2)
    for _ in range(3):
        next(it)
    assert not it.feed.running and it.feed.documents_in_process > 0


def test_local_file_source_pickles_for_workers():
    """A `text:` source (a cached TFDS builder TFDS cannot pickle) goes to the workers as a
    pickle that re-opens the same documents."""
    from research.data.sources import open_documents
    source = open_documents(f"text:{ROOT}/data/austen/persuasion.txt")
    blob = tokenize_pool._dump_source(source)
    assert blob is not None
    again = pickle.loads(blob)
    assert len(again) == len(source)
    assert [again[i] for i in (0, 7, len(source) - 1)] == [source[i] for i in
                                                            (0, 7, len(source) - 1)]


def test_killed_worker_surfaces(tokenizer):
    """A worker killed mid-run (out of memory, say) is a clear error, not a hang."""
    it = make_causal_lm_iterator(DOCS, tokenizer, tokenize_workers=1, prefetch=0, **LAYOUT)
    assert it.feed.start(wait=True)
    (pid,) = it.feed._executor.pids
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TokenizeWorkerError, match=f"worker process {pid} ended.*killed"):
        for _ in range(100):  # chunks already tokenised are used up first
            next(it)
    it.close()
    assert not _alive(pid), open(f"/proc/{pid}/stat").read()

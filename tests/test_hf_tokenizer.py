"""Hugging Face tokenizers (research.data.hf_tokenizer): tokenizer.json ids equal the `tokenizers`
library's and transformers' on Austen text, SentencePiece BPE models without a pad piece,
VOCAB as a model directory, special ids from the tokenizer configs, and a GPT-2 checkpoint
saved by transformers going through tools/convert_checkpoint.py into `research.generate`.

Every tokenizer is trained offline here on the bundled Austen text (small vocabularies).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
torch = pytest.importorskip("torch")

from research.checkpoints.hf import convert as hf_convert  # noqa: E402
from research.data import hf_tokenizer  # noqa: E402
from research.data.causal_lm import make_causal_lm_iterator  # noqa: E402
from research.data.hf_tokenizer import HFTokenizer  # noqa: E402
from research.data.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from research.data.tokenizer_base import VocabError, VocabNotFoundError  # noqa: E402
from research.data.wordpiece import WordPieceTokenizer  # noqa: E402
from research.errors import ConfigError  # noqa: E402
from tests.conftest import austen_paragraphs, xla_flags  # noqa: E402
from tests.test_hf_convert import run_tool  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"
TRAIN = austen_paragraphs(1500)  # Sense and Sensibility onwards is held out for the checks
TEXTS = (austen_paragraphs(6000)[5000:5200]
         + ["  Odd   spacing\tand\nnew lines, café — 東京 5€!"])


def _byte_level_bpe(vocab_size: int, specials: list[str]) -> "tokenizers.Tokenizer":
    """A GPT-2-style byte-level BPE trained on TRAIN."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAIN, trainer)
    return tok


@pytest.fixture(scope="module")
def gpt2_tok_dir(tmp_path_factory) -> pathlib.Path:
    """tokenizer.json + tokenizer_config.json as GPT2TokenizerFast.save_pretrained writes them
    (bos = eos = unk = <|endoftext|>, no pad)."""
    out = tmp_path_factory.mktemp("gpt2_tok")
    fast = transformers.GPT2TokenizerFast(tokenizer_object=_byte_level_bpe(400, [EOT]),
                                          bos_token=EOT, eos_token=EOT, unk_token=EOT)
    fast.save_pretrained(str(out))
    return out


def test_byte_level_bpe_ids_equal_tokenizers_and_transformers(gpt2_tok_dir):
    ours = load_tokenizer(str(gpt2_tok_dir / "tokenizer.json"))
    rust = tokenizers.Tokenizer.from_file(str(gpt2_tok_dir / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(str(gpt2_tok_dir))
    assert isinstance(ours, HFTokenizer)
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    expected = [e.ids for e in rust.encode_batch(TEXTS, add_special_tokens=False)]
    assert expected == hf(TEXTS, add_special_tokens=False)["input_ids"]
    assert [ours.encode(t) for t in TEXTS] == expected
    assert ours.encode_batch(TEXTS) == expected
    assert sum(map(len, expected)) > 20_000  # real text, many merges exercised
    assert [ours.decode(ids) for ids in expected[:20]] == TEXTS[:20]
    assert ours.decode(expected[0]) == hf.decode(expected[0], skip_special_tokens=True)
    assert ours.vocab_size == len(hf) == 400
    assert [ours.id_to_piece(i) for i in expected[0]] == hf.convert_ids_to_tokens(expected[0])
    # word starts are the pieces with GPT-2's space marker (and the special token)
    starts = {i for i in range(400) if ours.word_start_mask[i]}
    assert starts == {i for p, i in hf.get_vocab().items() if p.startswith("\u0120") or p == EOT}


def test_gpt2_special_ids_missing_pad_and_special_strings(gpt2_tok_dir):
    tok = load_tokenizer(str(gpt2_tok_dir))  # VOCAB as the model directory
    hf = transformers.AutoTokenizer.from_pretrained(str(gpt2_tok_dir))
    assert tok.path == str(gpt2_tok_dir / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == \
        (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 0, 0)
    assert hf.pad_token_id is None and tok.pad_id == tok.eos_id and tok.pad_is_special
    assert tok.add_bos_token is False  # GPT-2 prompts do not start with BOS
    assert tok.missing_special(["bos", "eos", "pad"]) == [] and tok.cls_id == -1
    ids = tok.encode(f"Emma{EOT}")  # special strings in text stay text
    assert tok.eos_id not in ids and tok.decode(ids) == f"Emma{EOT}"
    assert tok.decode([tok.bos_id] + tok.encode("Emma") + [tok.eos_id]) == "Emma"
    clone = pickle.loads(pickle.dumps(tok))  # how tokenize workers receive it
    assert clone.encode(f"Emma{EOT}") == ids and clone.eos_id == tok.eos_id
    batch = next(iter(make_causal_lm_iterator(TEXTS[:8], tok, seq_len=32, global_batch_size=2,
                                              seed=0, prefetch=0)))
    assert batch["inputs"][0, 0] == tok.bos_id


def test_special_ids_come_from_the_tokenizer_configs(tmp_path):
    """tokenizer_config.json names the tokens (as transformers reads them); generation_config
    fills what it leaves unset (Qwen: bos_token null); bare files guess the well-known names."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_end|>"]
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(320, specials), bos_token="<s>",
        eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(tmp_path / "a"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    tok = HFTokenizer(str(tmp_path / "a" / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == \
        (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 4, 3, 0)

    b = tmp_path / "b"  # Qwen-like: no bos in tokenizer_config; generation_config has one
    shutil.copytree(tmp_path / "a", b)
    config = json.loads((b / "tokenizer_config.json").read_text())
    config.update(bos_token=None, pad_token=None)
    (b / "tokenizer_config.json").write_text(json.dumps(config))
    (b / "generation_config.json").write_text(json.dumps({"bos_token_id": 2,
                                                         "eos_token_id": [4, 2]}))
    tok = HFTokenizer(str(b / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 4, 4)  # eos: tokenizer_config wins

    c = tmp_path / "c"  # a bare tokenizer.json: the well-known special tokens
    c.mkdir()
    shutil.copy(tmp_path / "a" / "tokenizer.json", c / "tokenizer.json")
    tok = load_tokenizer(str(c))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 3, 0)


@pytest.fixture(scope="module")
def sp_bpe_model(tmp_path_factory) -> pathlib.Path:
    """A Llama-2-style SentencePiece BPE model: <unk> 0, <s> 1, </s> 2, no pad piece."""
    prefix = tmp_path_factory.mktemp("llama_sp") / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN), model_prefix=str(prefix), vocab_size=500,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, minloglevel=2,
        num_threads=1)
    return pathlib.Path(f"{prefix}.model")


def test_sentencepiece_bpe_without_pad(sp_bpe_model, tmp_path):
    ref = spm.SentencePieceProcessor(model_file=str(sp_bpe_model))
    assert ref.pad_id() == -1
    tok = load_tokenizer(str(sp_bpe_model))
    assert isinstance(tok, Tokenizer)
    assert [tok.encode(t) for t in TEXTS] == ref.encode(TEXTS, out_type=int)
    assert tok.encode_batch(TEXTS) == ref.encode(TEXTS, out_type=int)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.pad_id == tok.eos_id == 2  # handled, not refused
    tok.require_special("bos", "eos", "pad")
    assert tok.decode(tok.encode(TEXTS[0])) == ref.decode(ref.encode(TEXTS[0]))
    batch = next(iter(make_causal_lm_iterator(TEXTS[:8], tok, seq_len=32, global_batch_size=2,
                                              seed=0, prefetch=0)))
    assert batch["inputs"].shape == (2, 32)
    # in a model directory, the HF configs beside it set the ids (here pad = <unk>)
    (tmp_path / "tokenizer.model").write_bytes(sp_bpe_model.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
         "pad_token": "<unk>"}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.path == str(tmp_path / "tokenizer.model")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)


def test_directory_vocab_picks_the_tokenizer_file(gpt2_tok_dir, sp_bpe_model, tmp_path):
    both = tmp_path / "both"  # tokenizer.json first, then tokenizer.model / spiece.model
    shutil.copytree(gpt2_tok_dir, both)
    shutil.copy(sp_bpe_model, both / "tokenizer.model")
    assert isinstance(load_tokenizer(str(both)), HFTokenizer)
    t5 = tmp_path / "t5"
    t5.mkdir()
    shutil.copy(sp_bpe_model, t5 / "spiece.model")
    assert load_tokenizer(str(t5)).path == str(t5 / "spiece.model")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                               "emma", "##s"]) + "\n")
    assert isinstance(load_tokenizer(str(bert)), WordPieceTokenizer)
    legacy = tmp_path / "legacy"  # GPT-2's vocab.json + merges.txt without tokenizer.json
    legacy.mkdir()
    rust = tokenizers.Tokenizer.from_file(str(gpt2_tok_dir / "tokenizer.json"))
    rust.model.save(str(legacy))
    shutil.copy(gpt2_tok_dir / "tokenizer_config.json", legacy)
    tok = load_tokenizer(str(legacy))
    assert tok.path == str(legacy / "vocab.json")
    assert tok.encode_batch(TEXTS) == [e.ids for e in rust.encode_batch(TEXTS)]
    assert tok.eos_id == 0 and tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]
    with pytest.raises(VocabNotFoundError, match="not a tokenizer file, and holds no") as err:
        load_tokenizer(str(tmp_path / "t5" / ".."))
    assert isinstance(err.value, ConfigError)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(VocabError, match="not a Hugging Face tokenizer"):
        load_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(VocabError, match="VOCAB is None"):
        load_tokenizer(None)


def test_bert_tokenizer_json_equals_the_wordpiece_vocab(tmp_path):
    """transformers 5 saves BERT's tokenizer as tokenizer.json only: it loads with the ids,
    special ids, word starts and decoding of the WordPiece vocab.txt it came from."""
    from tests.test_wordpiece import SENTENCES, VOCAB
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    fast = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "src"),
                                                          do_lower_case=True)
    fast.save_pretrained(str(tmp_path / "hf"))
    ours = load_tokenizer(str(tmp_path / "hf"))
    ref = WordPieceTokenizer(str(tmp_path / "src" / "vocab.txt"), lowercase=True)
    assert isinstance(ours, HFTokenizer)
    names = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
    assert [getattr(ours, f"{n}_id") for n in names] == [getattr(ref, f"{n}_id") for n in names]
    assert ours.encode_batch(SENTENCES) == ref.encode_batch(SENTENCES) == \
        fast(SENTENCES, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ours.word_start_mask, ref.word_start_mask)
    assert [ours.decode(ids) for ids in ref.encode_batch(SENTENCES)] == \
        [ref.decode(ids) for ids in ref.encode_batch(SENTENCES)]


def test_tokenizer_directory_on_gcs(gpt2_tok_dir, gcs):
    from research import storage
    for name in ("tokenizer.json", "tokenizer_config.json"):
        storage.write_bytes(f"{gcs}/gpt2/{name}", (gpt2_tok_dir / name).read_bytes())
    tok = load_tokenizer(f"{gcs}/gpt2")
    local = HFTokenizer(str(gpt2_tok_dir / "tokenizer.json"))
    assert tok.path == f"{gcs}/gpt2/tokenizer.json"
    assert tok.encode_batch(TEXTS[:20]) == local.encode_batch(TEXTS[:20])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (local.bos_id, local.eos_id, local.pad_id)
    # what the converter records in run.json, and copies on export, through storage too
    assert hf_convert.hf_tokenizer_file(f"{gcs}/gpt2") == tok.path
    hf_convert._copy_tokenizer_files(f"{gcs}/gpt2", f"{gcs}/export", "gpt2")
    assert sorted(storage.listdir(f"{gcs}/export")) == ["tokenizer.json", "tokenizer_config.json"]


def test_gpt2_import_then_generate_and_export(gpt2_tok_dir, tmp_path):
    """A GPT-2 saved by transformers -> convert_checkpoint.py --from_hf -> `python -m
    research.generate` in a subprocess (no VOCAB flag: run.json points at the tokenizer; this
    died on `vocab: null`) -> --to_hf carries the tokenizer files."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(gpt2_tok_dir, hf_dir)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(hf_dir))
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env,  # noqa: E731
                                      capture_output=True, text=True, timeout=180)
    run_tool(f"--from_hf={hf_dir}", f"--to={tmp_path / 'ours'}")  # the CLI's main
    info = json.loads((tmp_path / "ours" / "run.json").read_text())
    assert info["vocab"] == str(hf_dir / "tokenizer.json")
    gen = run("-m", "research.generate", f"--workdir={tmp_path / 'ours'}", "--prompt=Emma was",
              "--max_new_tokens=6", "--temperature=0")
    assert gen.returncode == 0, gen.stderr
    lines = gen.stdout.splitlines()
    assert lines[0] == "--- Emma was" and lines[1].startswith("Emma was") and len(lines[1]) > 8

    run_tool(f"--from={tmp_path / 'ours'}", f"--to_hf={tmp_path / 'back'}")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "back"))
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert back(TEXTS[:5], add_special_tokens=False)["input_ids"] == \
        HFTokenizer(str(hf_dir / "tokenizer.json")).encode_batch(TEXTS[:5])
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (0, 0)
    np.testing.assert_equal(hf_tokenizer.pad_fallback(-1, -1, -1), (0, False))


def test_exported_sentencepiece_decoder_loads_with_autotokenizer(tmp_path):
    """A GPT run on this project's SentencePiece model exported to HF: AutoTokenizer on the
    exported directory gives research.generate's prompt ids (BOS first, then sentencepiece's
    ids) and the same text back. (Without the written tokenizer_config.json it followed
    model_type gpt2 to a byte-level BPE with other ids.) A BERT export gets no such config."""
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from research.checkpoints.manager import save_params
    from research.models.transformer import CausalLM, TransformerConfig

    vocab = str(pathlib.Path(__file__).resolve().parent.parent / "data" / "tokenizers"
                / "austen_8k.model")
    ours = load_tokenizer(vocab)
    cfg = TransformerConfig(num_layers=1, d_model=16, num_heads=2, mlp_dim=32, max_len=32
                            ).with_vocab(ours.vocab_size).resolved()
    shapes = nn.unbox(jax.eval_shape(CausalLM(cfg).init, jax.random.key(0),
                                     jnp.ones((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), shapes)
    workdir = tmp_path / "run"
    save_params(str(workdir / "checkpoints"), params, step=1)
    (workdir / "run.json").write_text(json.dumps({
        "objective": "causal_lm", "vocab": vocab, "model_config": dataclasses.asdict(cfg)}))
    run_tool(f"--from={workdir}", f"--to_hf={tmp_path / 'hf'}")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"] == ours.id_to_piece(ours.bos_id)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in list(TEXTS[:20]) + ["  Two  spaces\nand a newline", "ends with a space "]:
        ids = [ours.bos_id] + ours.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert (hf.eos_token_id, hf.pad_token_id) == (ours.eos_id, ours.pad_id)
    (tmp_path / "bert").mkdir()
    hf_convert._copy_tokenizer_files(vocab, str(tmp_path / "bert"), "bert")
    assert os.listdir(tmp_path / "bert") == ["tokenizer.model"]

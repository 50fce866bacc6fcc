"""Decoding equals Hugging Face `transformers`' `generate`, token for token: greedy decoding
(EOS stopping included) and beam search (num_beams, length_penalty, early_stopping), on a
ragged, left-padded batch of prompts, for GPT-2, Llama (GQA, untied embeddings), Qwen2 (q/k/v
biases), Mistral (a sliding window shorter than the generated length) and Gemma.

Each HF model is built offline from a tiny random config, its weights randomised (so biases and
norms matter), converted with research.checkpoints.hf, and run in float32 on both sides; the
comparison is at the token-id level (no tokenizer). EOS is a token the model actually emits
(chosen from its own greedy continuations), so rows and beams end at different lengths.
"""

from __future__ import annotations

import collections
import functools

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from research.checkpoints.hf import convert as hf_convert  # noqa: E402
from research.checkpoints.hf.rules import nest  # noqa: E402
from research.generate import generate  # noqa: E402
from research.models.transformer import CausalLM  # noqa: E402

# HF config keywords per model_type: a family research.checkpoints.hf converts joins the
# parity tests with its entry here.
FAMILIES = {
    "gpt2": dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    # A sliding window far shorter than prompt + NEW_TOKENS (without it the tokens differ).
    "mistral": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    sliding_window=8),
    # MQA, GeGLU, tied embeddings scaled by sqrt(d_model), the 1 + weight RMSNorm.
    "gemma": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  max_position_embeddings=64),
}
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
PAD = 0
NEW_TOKENS = 20


@functools.lru_cache(maxsize=None)
def hf_and_ours(model_type: str):
    """(HF model, our CausalLM, our params) with the same random weights."""
    config = transformers.AutoConfig.for_model(model_type, **FAMILIES[model_type],
                                               bos_token_id=None, eos_token_id=None,
                                               pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(1 + noise if (p.ndim == 1 and name.endswith("weight")) else noise)
    hf.eval()
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    converted = hf_convert.FAMILIES[model_type].from_hf(config.to_dict(), state)
    return hf, CausalLM(converted.cfg), jax.tree.map(jnp.asarray, nest(converted.params))


def hf_generate(hf, prompts: list[list[int]], eos: int, **kw) -> list[list[int]]:
    """HF's new tokens per row (left padding + attention mask), cut after the first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=eos, pad_token_id=PAD, **kw)
    rows = out[:, width:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


@functools.lru_cache(maxsize=None)
def emitted_eos(model_type: str) -> int:
    """The token our greedy continuations (no EOS) emit most often: an EOS that ends rows."""
    _, model, params = hf_and_ours(model_type)
    rows = generate(model, params, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=-1, pad_id=PAD,
                    temperature=0.0)
    return collections.Counter(t for row in rows for t in row).most_common(1)[0][0]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_greedy_equals_hf(model_type):
    hf, model, params = hf_and_ours(model_type)
    eos = emitted_eos(model_type)
    ours = generate(model, params, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=eos, pad_id=PAD,
                    temperature=0.0)
    assert ours == hf_generate(hf, PROMPTS, eos, num_beams=1)
    assert any(len(row) < NEW_TOKENS for row in ours)  # EOS ended a row early


# (num_beams, length_penalty, early_stopping). On the GPT-2 model, True and "never" give other
# tokens than False; the other families take two settings. One num_beams: fewer compilations.
BEAMS = [(3, 1.0, False), (3, 2.0, False), (3, 1.0, True), (3, 1.5, False), (3, 1.5, "never"),
         (3, -1.0, False)]
BEAM_CASES = [("gpt2", *beams) for beams in BEAMS] + [
    (model_type, *beams) for model_type in sorted(FAMILIES) if model_type != "gpt2"
    for beams in BEAMS[-2:]]


@pytest.mark.parametrize("model_type, num_beams, length_penalty, early_stopping", BEAM_CASES)
def test_beam_search_equals_hf(model_type, num_beams, length_penalty, early_stopping):
    hf, model, params = hf_and_ours(model_type)
    eos = emitted_eos(model_type)
    ours = generate(model, params, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=eos, pad_id=PAD,
                    num_beams=num_beams, length_penalty=length_penalty,
                    early_stopping=early_stopping)
    assert ours == hf_generate(hf, PROMPTS, eos, num_beams=num_beams,
                               length_penalty=length_penalty, early_stopping=early_stopping)
    if length_penalty < 1.0:  # short finished hypotheses win
        assert any(len(row) < NEW_TOKENS for row in ours)

"""Sequence classification and regression heads for fine-tuning (encoder or decoder).

Parameter names line up with the pretraining models so that a pretrained checkpoint restores
into the shared part (`research.checkpoints.init_from`):

  encoder (BERT): encoder/... + pooler/{kernel,bias} (tanh over [CLS]) + classifier/{kernel,bias}
  decoder (GPT):  decoder/... + classifier/{kernel,bias} over the last non-pad token
  tokens (BERT):  encoder/... + classifier/{kernel,bias} on every position (TokenClassifier)
  spans (BERT):   encoder/... + qa_outputs/{kernel,bias}: start/end logits (SpanExtractor)
  choices (BERT): encoder/... + pooler/... + choice_classifier/{kernel,bias}: one score per
                  choice (MultipleChoiceClassifier)

The head sees dropout (`head_dropout`) and starts from N(0, 0.02) weights and zero bias, as
BERT fine-tuning does.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.layers import Dropout, normal_init, zeros_init
from research.models.transformer import TransformerConfig, TransformerStack

Array = jax.Array

TASKS = ("binary", "multiclass", "regression")


def _right_padded(cfg: TransformerConfig) -> TransformerConfig:
    """The stack's config for input_mask segment ids (1 for the real tokens, then 0)."""
    return dataclasses.replace(cfg, padding_segments=True)


class SequenceClassifier(nn.Module):
    """Returns float32 [B, num_outputs] scores (logits, or the value for regression).

    Parameters (logical axes): encoder/... + pooler/{kernel, bias} [D, D] ('mlp', 'embed'),
    [D] ('embed',) when `cfg.causal` is False, else decoder/...; classifier/{kernel, bias}
    [D, num_outputs] ('embed', 'classes'), [num_outputs] ('classes',).
    """

    cfg: TransformerConfig
    num_outputs: int
    head_dropout: float = 0.1
    head_init_std: float = 0.02

    def setup(self):
        cfg = self.cfg
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        if cfg.causal:
            self.decoder = TransformerStack(_right_padded(cfg), name="decoder")
        else:
            self.encoder = TransformerStack(_right_padded(cfg), name="encoder")
            self.pooler = nn.Dense(cfg.d_model,
                                   kernel_init=normal_init(cfg.init_std, ("mlp", "embed")),
                                   bias_init=zeros_init(("embed",)), name="pooler", **dense)
        self.dropout = Dropout(self.head_dropout)
        self.classifier = nn.Dense(self.num_outputs,
                                   kernel_init=normal_init(self.head_init_std, ("embed", "classes")),
                                   bias_init=zeros_init(("classes",)), name="classifier", **dense)

    def __call__(self, input_ids: Array, input_mask: Array, token_type_ids: Array,
                 last_index: Array, *, deterministic: bool = True) -> Array:
        """input_ids, input_mask (1 real / 0 pad), token_type_ids: int[B, L];
        last_index: int[B], the last real token (decoder pooling).
        Returns float32 [B, num_outputs]."""
        segments = input_mask.astype(jnp.int32)
        if self.cfg.causal:
            hidden = self.decoder(input_ids, segment_ids=segments, deterministic=deterministic)
            pooled = jnp.take_along_axis(hidden, last_index[:, None, None].astype(jnp.int32),
                                         axis=1)[:, 0]
        else:
            hidden = self.encoder(input_ids, segment_ids=segments, token_type_ids=token_type_ids,
                                  deterministic=deterministic)
            pooled = jnp.tanh(self.pooler(hidden[:, 0]))
        pooled = self.dropout(pooled, deterministic=deterministic)
        return self.classifier(pooled).astype(jnp.float32)


class SpanExtractor(nn.Module):
    """Extractive QA head (BERT's SQuAD head): a dense D -> 2 over the encoder's final hidden
    states gives the start and end logits of every position.

    Parameters (logical axes): encoder/... (cfg.causal False); qa_outputs/{kernel, bias}
    [D, 2] ('embed', 'classes'), [2] ('classes',), N(0, head_init_std) and zero, as Hugging
    Face `BertForQuestionAnswering`'s `qa_outputs` (no pooler, no head dropout).
    """

    cfg: TransformerConfig
    head_init_std: float = 0.02

    def setup(self):
        cfg = self.cfg
        self.encoder = TransformerStack(_right_padded(cfg), name="encoder")
        self.qa_outputs = nn.Dense(2, kernel_init=normal_init(self.head_init_std,
                                                              ("embed", "classes")),
                                   bias_init=zeros_init(("classes",)), name="qa_outputs",
                                   dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)

    def __call__(self, input_ids: Array, input_mask: Array, token_type_ids: Array, *,
                 deterministic: bool = True) -> tuple[Array, Array]:
        """input_ids, input_mask (1 real / 0 pad), token_type_ids: int[B, L].
        Returns (start_logits, end_logits), float32 [B, L] each."""
        hidden = self.encoder(input_ids, segment_ids=input_mask.astype(jnp.int32),
                              token_type_ids=token_type_ids, deterministic=deterministic)
        logits = self.qa_outputs(hidden).astype(jnp.float32)  # [B, L, 2]
        return logits[..., 0], logits[..., 1]


class TokenClassifier(nn.Module):
    """Per-token classification (NER, POS, chunking) on a bidirectional encoder, as HF
    `BertForTokenClassification`: dropout on the final hidden states, then a dense layer.
    Returns float32 logits [B, L, num_labels].

    Parameters (logical axes): encoder/... (no pooler); classifier/{kernel, bias}
    [D, num_labels] ('embed', 'classes'), [num_labels] ('classes',).
    """

    cfg: TransformerConfig
    num_labels: int
    head_dropout: float = 0.1
    head_init_std: float = 0.02

    def setup(self):
        cfg = self.cfg
        self.encoder = TransformerStack(_right_padded(cfg), name="encoder")
        self.dropout = Dropout(self.head_dropout)
        self.classifier = nn.Dense(self.num_labels,
                                   kernel_init=normal_init(self.head_init_std, ("embed", "classes")),
                                   bias_init=zeros_init(("classes",)), name="classifier",
                                   dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)

    def __call__(self, input_ids: Array, input_mask: Array, token_type_ids: Array, *,
                 deterministic: bool = True) -> Array:
        """input_ids, input_mask (1 real / 0 pad), token_type_ids: int[B, L].
        Returns float32 [B, L, num_labels]."""
        hidden = self.encoder(input_ids, segment_ids=input_mask.astype(jnp.int32),
                              token_type_ids=token_type_ids, deterministic=deterministic)
        hidden = self.dropout(hidden, deterministic=deterministic)
        return self.classifier(hidden).astype(jnp.float32)


class MultipleChoiceClassifier(nn.Module):
    """Multiple choice (SWAG) on a bidirectional encoder, as HF `BertForMultipleChoice`: each
    choice's [CLS] ctx [SEP] ending [SEP] is encoded on its own, the pooled [CLS] (tanh dense)
    goes through dropout and a dense D -> 1; the N scores of an example are its logits.

    Parameters (logical axes): encoder/... + pooler/{kernel, bias} [D, D] ('mlp', 'embed'),
    [D] ('embed',); choice_classifier/{kernel, bias} [D, 1] ('embed', 'classes'), [1]
    ('classes',) (its own name, so an export tells it from a 1-output SequenceClassifier).
    """

    cfg: TransformerConfig
    head_dropout: float = 0.1
    head_init_std: float = 0.02

    def setup(self):
        cfg = self.cfg
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        self.encoder = TransformerStack(_right_padded(cfg), name="encoder")
        self.pooler = nn.Dense(cfg.d_model, kernel_init=normal_init(cfg.init_std, ("mlp", "embed")),
                               bias_init=zeros_init(("embed",)), name="pooler", **dense)
        self.dropout = Dropout(self.head_dropout)
        self.choice_classifier = nn.Dense(
            1, kernel_init=normal_init(self.head_init_std, ("embed", "classes")),
            bias_init=zeros_init(("classes",)), name="choice_classifier", **dense)

    def __call__(self, input_ids: Array, input_mask: Array, token_type_ids: Array, *,
                 deterministic: bool = True) -> Array:
        """input_ids, input_mask (1 real / 0 pad), token_type_ids: int[B, N, L].
        Returns float32 [B, N] choice logits."""
        b, n, length = input_ids.shape
        flat = lambda x: x.reshape(b * n, length)  # noqa: E731
        hidden = self.encoder(flat(input_ids), segment_ids=flat(input_mask).astype(jnp.int32),
                              token_type_ids=flat(token_type_ids), deterministic=deterministic)
        pooled = jnp.tanh(self.pooler(hidden[:, 0]))
        pooled = self.dropout(pooled, deterministic=deterministic)
        return self.choice_classifier(pooled).astype(jnp.float32).reshape(b, n)

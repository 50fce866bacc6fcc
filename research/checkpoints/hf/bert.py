"""Hugging Face BERT (`model_type: bert`) <-> `BertPretrainer` (research.models.bert) and
`SequenceClassifier` (research.models.heads) parameters.

Our tree: encoder/... (post-LN TransformerStack with token types and an embedding LayerNorm),
and the heads the HF file holds: pooler/..., mlm_transform/..., mlm_norm/...,
mlm_output_bias, mlm_output/kernel (untied embeddings only), nsp/..., classifier/...
Supported HF architectures: BertModel, BertForPreTraining, BertForMaskedLM,
BertForSequenceClassification, BertForQuestionAnswering (qa_outputs/... <-> qa_outputs, the
`SpanExtractor` head); absolute position embeddings only.
BertForTokenClassification is the `TokenClassifier` head: encoder/... + classifier/... and no
pooler (how import and export tell it from BertForSequenceClassification).
BertForMultipleChoice is the `MultipleChoiceClassifier` head: encoder/... + pooler/... +
choice_classifier/... <-> classifier (D -> 1); import recognises it by config.json's
architectures (its tensors are those of a 1-label BertForSequenceClassification).

Shapes: D d_model, N heads, H head_dim, F mlp width, V vocab, P max positions, T token types,
C classes.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable

from research.checkpoints.errors import ConversionError
from research.checkpoints.hf import family as fam
from research.checkpoints.hf.rules import (
    Flat, Rule, apply_rules_to_hf, apply_rules_to_ours, dims, layernorm, linear,
    raise_unknown_params, unused_hf_keys, verbatim)
from research.models.transformer import TransformerConfig

SUPPORTED = "BertModel, BertForPreTraining, BertForMaskedLM, BertForSequenceClassification"
SUPPORTED += ", BertForQuestionAnswering"
SUPPORTED += ", BertForTokenClassification"
SUPPORTED += ", BertForMultipleChoice"

# Head group -> the key of our params that marks it present.
_HEAD_PARAMS = {"pooler": "pooler/kernel", "mlm": "mlm_transform/kernel",
                "mlm_output": "mlm_output/kernel", "nsp": "nsp/kernel",
                "classifier": "classifier/kernel"}
_HEAD_PARAMS["qa"] = "qa_outputs/kernel"  # BertForQuestionAnswering
_HEAD_PARAMS["choice"] = "choice_classifier/kernel"  # BertForMultipleChoice


def bert_rules(cfg: TransformerConfig, groups: Iterable[str], num_labels: int = 0,
               prefix: str = "bert.") -> list[Rule]:
    """Rules for a BERT checkpoint.

    groups: subset of {"pooler", "mlm", "mlm_output", "nsp", "classifier"}: which heads the
    checkpoint holds ("mlm_output" = an untied MLM output matrix). prefix: "bert." for the
    task models (BertForPreTraining, ...), "" for a bare BertModel.
    """
    d, n, h, f, v = dims(cfg)
    groups = set(groups)
    e, p = "encoder", prefix
    rules = [verbatim(f"{p}embeddings.word_embeddings.weight", f"{e}/token_embed/embedding", (v, d)),
             verbatim(f"{p}embeddings.position_embeddings.weight",
                      f"{e}/position_embed/embedding", (cfg.max_len, d)),
             verbatim(f"{p}embeddings.token_type_embeddings.weight", f"{e}/type_embed/embedding",
                      (cfg.type_vocab_size, d)),
             *layernorm(f"{p}embeddings.LayerNorm", f"{e}/embedding_norm", d)]
    for i in range(cfg.num_layers):
        hl, ol = f"{p}encoder.layer.{i}", f"{e}/layer_{i}"
        for name in ("query", "key", "value"):
            rules += linear(f"{hl}.attention.self.{name}", f"{ol}/attention/{name}", (d,), (n, h))
        rules += linear(f"{hl}.attention.output.dense", f"{ol}/attention/out", (n, h), (d,))
        rules += layernorm(f"{hl}.attention.output.LayerNorm", f"{ol}/attention_norm", d)
        rules += linear(f"{hl}.intermediate.dense", f"{ol}/mlp/wi", (d,), (f,))
        rules += linear(f"{hl}.output.dense", f"{ol}/mlp/wo", (f,), (d,))
        rules += layernorm(f"{hl}.output.LayerNorm", f"{ol}/mlp_norm", d)
    if "pooler" in groups:
        rules += linear(f"{p}pooler.dense", "pooler", (d,), (d,))
    if "mlm" in groups:
        rules += linear("cls.predictions.transform.dense", "mlm_transform", (d,), (d,))
        rules += layernorm("cls.predictions.transform.LayerNorm", "mlm_norm", d)
        rules.append(verbatim("cls.predictions.bias", "mlm_output_bias", (v,)))
    if "mlm_output" in groups:
        rules.append(Rule("cls.predictions.decoder.weight", "mlm_output/kernel", (v, d), (d, v),
                          transpose=True))
    if "nsp" in groups:
        rules += linear("cls.seq_relationship", "nsp", (d,), (2,))
    if "classifier" in groups:
        rules += linear("classifier", "classifier", (d,), (num_labels,))
    if "qa" in groups:  # BertForQuestionAnswering: start / end logits
        rules += linear("qa_outputs", "qa_outputs", (d,), (2,))
    if "choice" in groups:  # BertForMultipleChoice: one score per choice
        rules += linear("classifier", "choice_classifier", (d,), (1,))
    return rules


# ----------------------------------------------------------------------------- import ---------


def bert_config_from_hf(hf: dict) -> TransformerConfig:
    """TransformerConfig of a HF BERT config.json: post-LN, embedding LayerNorm, learned
    absolute positions, token types, bidirectional, vocab_size bound exactly."""
    pos = hf.get("position_embedding_type", "absolute")
    fam.reject(pos not in (None, "absolute"),
               f"config.json position_embedding_type={pos!r}: relative position embeddings are "
               "not supported (TransformerStack has learned absolute positions); only "
               "'absolute' BERT checkpoints convert.")
    fam.reject(bool(hf.get("is_decoder")) or bool(hf.get("add_cross_attention")),
               "config.json is_decoder/add_cross_attention: BERT as a decoder is not supported; "
               "convert an encoder checkpoint.")
    d, n = fam.require(hf, "hidden_size"), fam.require(hf, "num_attention_heads")
    fam.reject(d % n != 0, f"hidden_size={d} is not divisible by num_attention_heads={n}.")
    return TransformerConfig(
        vocab_size=fam.require(hf, "vocab_size"), num_layers=fam.require(hf, "num_hidden_layers"),
        d_model=d, num_heads=n, mlp_dim=fam.require(hf, "intermediate_size"),
        activation=fam.activation_from_hf(hf.get("hidden_act", "gelu"), "hidden_act"),
        norm="layernorm", norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        norm_placement="post", position="learned",
        max_len=fam.require(hf, "max_position_embeddings"),
        type_vocab_size=int(hf.get("type_vocab_size", 2)), embedding_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), use_bias=True,
        dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)), causal=False)


def _normalise_hf_keys(state: Flat) -> Flat:
    """Old TF-converted BERT checkpoints name LayerNorm parameters gamma/beta; the MLM output
    bias may only be stored as cls.predictions.decoder.bias (HF ties the two)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    if "cls.predictions.bias" not in out and "cls.predictions.decoder.bias" in out:
        out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
    return out


def bert_from_hf(hf_config: dict, state: Flat) -> fam.Converted:
    """BERT state dict (with or without the `bert.` prefix) -> BertPretrainer-layout params
    (plus classifier/... for a BertForSequenceClassification)."""
    state = _normalise_hf_keys(state)
    cfg = bert_config_from_hf(hf_config)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
    groups = {g for g, key in (("pooler", f"{prefix}pooler.dense.weight"),
                               ("mlm", "cls.predictions.transform.dense.weight"),
                               ("nsp", "cls.seq_relationship.weight"),
                               ("classifier", "classifier.weight")) if key in state}
    if prefix and "qa_outputs.weight" in state:  # BertForQuestionAnswering
        groups.add("qa")
    ignorable = ["cls.predictions.decoder.bias"]  # HF ties it to cls.predictions.bias
    if "mlm" in groups and "cls.predictions.decoder.weight" in state:
        if cfg.tie_embeddings:
            ignorable.append("cls.predictions.decoder.weight")  # HF ties it to the embeddings
        else:
            groups.add("mlm_output")
    elif "mlm" in groups and not cfg.tie_embeddings:
        raise ConversionError("config.json tie_word_embeddings=false but the checkpoint has no "
                              "cls.predictions.decoder.weight (the untied MLM output matrix).")
    if _is_multiple_choice(hf_config, groups, state):  # BertForMultipleChoice
        groups = (groups - {"classifier"}) | {"choice"}
    num_labels = int(state["classifier.weight"].shape[0]) if "classifier" in groups else 0
    rules = bert_rules(cfg, groups, num_labels, prefix)
    fam.raise_unmapped(unused_hf_keys(state, rules, ignorable), "bert", SUPPORTED)
    if "mlm" in groups and cfg.activation != "gelu_exact":
        logging.warning("HF BERT hidden_act=%r also drives its MLM transform; BertPretrainer's MLM "
                        "head always uses exact GELU, so MLM logits will differ slightly.",
                        hf_config.get("hidden_act"))
    objective = "classification" if "classifier" in groups else "bert_pretraining"
    objective = "extractive_qa" if "qa" in groups else objective
    if _is_token_classifier(hf_config, groups):  # BertForTokenClassification
        objective = "token_classification"
    if "choice" in groups:
        objective = "multiple_choice"
    return fam.Converted(cfg, apply_rules_to_ours(rules, state), objective, "bert", num_labels)


def _is_token_classifier(hf_config: dict, groups: set[str]) -> bool:
    """A BertForTokenClassification: per-token `classifier` on the final hidden states, named
    in config.json's architectures, or recognised by having no pooler (HF builds it with
    add_pooling_layer=False; BertForSequenceClassification always has one)."""
    if "classifier" not in groups:
        return False
    return ("BertForTokenClassification" in (hf_config.get("architectures") or [])
            or "pooler" not in groups)


def _is_multiple_choice(hf_config: dict, groups: set[str], state: Flat) -> bool:
    """A BertForMultipleChoice: named in config.json's architectures, with a pooler and a
    D -> 1 `classifier`."""
    if "BertForMultipleChoice" not in (hf_config.get("architectures") or []):
        return False
    if not {"pooler", "classifier"} <= groups or state["classifier.weight"].shape[0] != 1:
        raise ConversionError("config.json names BertForMultipleChoice but the checkpoint has "
                              "no bert.pooler and 1-output classifier; it is not one.")
    return True


# ----------------------------------------------------------------------------- export ---------


def _bert_groups(params: Flat) -> tuple[set[str], str, int]:
    """(head groups present, HF architecture, num_labels) of our BERT-family params."""
    groups = {g for g, k in _HEAD_PARAMS.items() if k in params}
    num_labels = int(params["classifier/kernel"].shape[-1]) if "classifier" in groups else 0
    if {"mlm", "nsp"} <= groups:
        arch = "BertForPreTraining"
    elif "mlm" in groups:
        arch = "BertForMaskedLM"
    elif "classifier" in groups and "pooler" not in groups:  # TokenClassifier: no pooler
        arch = "BertForTokenClassification"
    elif "classifier" in groups:
        arch = "BertForSequenceClassification"
    elif "qa" in groups:
        arch = "BertForQuestionAnswering"
    elif "choice" in groups:
        arch = "BertForMultipleChoice"
    else:
        arch = "BertModel"
    return groups, arch, num_labels


def _check_exportable(cfg: TransformerConfig) -> None:
    """Raises if `cfg` uses an option HF BERT cannot express."""
    problems = fam.export_problems(cfg, "bert")
    if cfg.norm_placement != "post":
        problems.append("norm_placement='pre' (HF BERT is post-LN)")
    if not cfg.embedding_norm:
        problems.append("embedding_norm=False (HF BERT normalises the embeddings)")
    if cfg.type_vocab_size < 1:
        problems.append("type_vocab_size=0 (HF BERT has token-type embeddings)")
    fam.raise_export_problems(problems, "bert")


def bert_config_to_hf(cfg: TransformerConfig, architecture: str, num_labels: int = 0,
                      pad_token_id: int | None = None) -> dict:
    """HF BERT config.json for `cfg`."""
    out = {"architectures": [architecture], "model_type": "bert",
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "intermediate_size": cfg.mlp_dim, "hidden_act": fam.ACT_TO_HF[cfg.activation],
           "hidden_dropout_prob": cfg.dropout_rate,
           "attention_probs_dropout_prob": cfg.attention_dropout_rate,
           "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
           "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps,
           "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings,
           "pad_token_id": 0 if pad_token_id is None else pad_token_id,
           "torch_dtype": "float32"}
    if num_labels:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    return out


def bert_to_hf(cfg: TransformerConfig, params: Flat,
               special: dict[str, int] | None = None) -> tuple[dict, Flat]:
    """Our BERT-family flat params (unstacked) -> (HF config.json, HF state dict);
    `special["pad"]`, if given, becomes pad_token_id."""
    _check_exportable(cfg)
    groups, arch, num_labels = _bert_groups(params)
    if "mlm" in groups and cfg.activation != "gelu_exact":
        logging.warning("exporting activation=%r: HF BERT's MLM transform will use it too, "
                        "while ours uses exact GELU.", cfg.activation)
    rules = bert_rules(cfg, groups, num_labels, prefix="" if arch == "BertModel" else "bert.")
    raise_unknown_params(params, rules)
    state = apply_rules_to_hf(rules, params)
    return bert_config_to_hf(cfg, arch, num_labels, (special or {}).get("pad")), state


def _is_encoder(cfg: TransformerConfig) -> bool:
    return not cfg.causal


FAMILY = fam.ModelFamily(model_type="bert", from_hf=bert_from_hf, to_hf=bert_to_hf,
                         can_export=_is_encoder)

"""The objective interface (research/objectives/base.py) and the explicit call order of
ClassificationObjective: each step returns a new objective, and skipping one fails naming it."""

import dataclasses

import numpy as np
import pytest

from research.errors import ConfigError
from research.models.transformer import TransformerConfig
from research.objectives.base import Objective
from research.objectives.bert_pretraining import BertPretrainingObjective
from research.objectives.causal_lm import CausalLMObjective
from research.objectives.classification import ClassificationObjective

CFG = TransformerConfig(num_layers=1, d_model=32, num_heads=4, mlp_dim=64, max_len=64,
                        vocab_size=128)


class _Tokenizer:
    """Just enough of a tokenizer for make_iterator's checks."""

    pad_id, cls_id, sep_id, bos_id, eos_id = 0, 1, 2, 3, 4

    def require_special(self, *pieces):
        pass

    def encode(self, text):
        return [5 + (ord(c) % 100) for c in text]


@pytest.mark.parametrize("objective", [CausalLMObjective(), BertPretrainingObjective(),
                                       ClassificationObjective()], ids=lambda o: o.name)
def test_every_objective_implements_the_interface(objective):
    assert isinstance(objective, Objective)
    assert objective.name and objective.required_special_pieces
    batch = objective.dummy_batch(2, 8)
    assert all(v.shape[0] == 2 for v in batch.values())
    assert objective.has_predictions == isinstance(objective, ClassificationObjective)
    if not objective.has_predictions:  # document streams: no epochs, no predictions
        assert objective.steps_per_epoch(object(), 8) is None
        assert objective.with_training_data(object()) is objective
        with pytest.raises(NotImplementedError):
            objective.predict(None, None, batch)
    assert objective.eval_perplexity == isinstance(objective, CausalLMObjective)


def test_training_flops_come_from_the_objective():
    enc = dataclasses.replace(CFG, causal=False, type_vocab_size=2)
    assert CausalLMObjective().training_flops(CFG, 2, 16) > 0
    assert BertPretrainingObjective().training_flops(enc, 2, 16) > 0
    with pytest.raises(ConfigError, match="no model FLOP count"):
        ClassificationObjective().training_flops(CFG, 2, 16)


def test_objectives_refuse_a_model_config_that_does_not_fit():
    with pytest.raises(ConfigError, match="causal decoder"):
        CausalLMObjective().make_model(dataclasses.replace(CFG, causal=False))
    with pytest.raises(ConfigError, match="bidirectional encoder"):
        BertPretrainingObjective().make_model(CFG)
    with pytest.raises(ConfigError, match="num_labels=2"):
        ClassificationObjective(task="binary", num_labels=3)


def _write(path, rows):
    path.write_text("label\ttext\n" + "".join(f"{lab}\t{text}\n" for lab, text in rows))
    return f"tsv:{path}"


def test_classification_resolves_in_explicit_steps_without_mutating(tmp_path):
    train = _write(tmp_path / "train.tsv", [("pos", "good"), ("neg", "bad"), ("pos", "fine")])
    dev = _write(tmp_path / "dev.tsv", [("pos", "nice"), ("pos", "great")])
    configured = ClassificationObjective()
    with pytest.raises(RuntimeError, match="with_training_data"):
        configured.open_source(dev, role="eval")  # label ids would not agree with training

    source = configured.open_source(train, role="train")
    trained = configured.with_training_data(source)
    assert trained is not configured and configured.label_names is None  # nothing mutated
    assert trained.label_names == ["neg", "pos"]  # sorted string labels of the train split
    # The eval split has only "pos": read with the training names, its id is still 1.
    assert trained.open_source(dev, role="eval").labels.tolist() == [1, 1]
    assert trained.format_prediction(0.0) == "neg"
    assert trained.steps_per_epoch(source, 2) == 2

    with pytest.raises(RuntimeError, match="for_model"):
        trained.make_iterator(source, _Tokenizer(), seq_len=8, global_batch_size=2, seed=0)
    encoder = trained.for_model(dataclasses.replace(CFG, causal=False))
    decoder = trained.for_model(CFG)
    assert (encoder.style, decoder.style, trained.style) == ("encoder", "decoder", None)
    batch = next(encoder.make_iterator(source, _Tokenizer(), seq_len=8, global_batch_size=2,
                                       seed=0))
    assert batch["input_ids"][:, 0].tolist() == [_Tokenizer.cls_id] * 2  # [CLS] first
    assert np.all(batch["weight"] == 1)


def test_classification_label_count_must_match_the_data(tmp_path):
    train = _write(tmp_path / "train.tsv", [("a", "x"), ("b", "y"), ("c", "z")])
    objective = ClassificationObjective()
    with pytest.raises(ConfigError, match="num_labels=3"):
        objective.with_training_data(objective.open_source(train, role="train"))

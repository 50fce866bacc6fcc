"""Imports every module that defines gin configurables, so any config can be parsed."""

from research.data import sources  # noqa: F401
from research.models import transformer  # noqa: F401
from research.objectives import bert_pretraining, causal_lm, classification  # noqa: F401
from research.objectives import extractive_qa  # noqa: F401
from research.objectives import token_classification  # noqa: F401
from research.objectives import multiple_choice  # noqa: F401
from research.training import loop, optim, partitioning  # noqa: F401

"""Imports every module that defines gin configurables, so any config can be parsed."""

from research import bert, classification, model, objectives, optim, partitioning, trainer  # noqa: F401
from research.data import sources  # noqa: F401

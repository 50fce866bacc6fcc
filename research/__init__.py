"""research: a JAX/Flax framework for transformer pretraining and fine-tuning."""

__version__ = "0.1.0"

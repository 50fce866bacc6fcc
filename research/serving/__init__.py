"""Serving a causal LM: the continuous-batching inference engine (`research.serving.engine`)."""

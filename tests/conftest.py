"""Shared fixtures. Eight simulated CPU devices are set before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import glob
import pathlib

import gin
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
AUSTEN = sorted(glob.glob(str(ROOT / "data" / "austen" / "*.txt")))


def austen_paragraphs(limit: int | None = None) -> list[str]:
    """Paragraphs (blank-line separated) of the bundled Austen novels, in file order."""
    out = []
    for path in AUSTEN:
        text = pathlib.Path(path).read_text(encoding="utf-8")
        out.extend(p.strip() for p in text.split("\n\n") if p.strip())
        if limit and len(out) >= limit:
            return out[:limit]
    return out


def causal_block_elements(t: int, blocks: int) -> int:
    """Attention score elements per (batch row, head) of causal self-attention over t tokens in
    `blocks` query blocks (TransformerConfig.attention_query_blocks), each block scoring its queries
    against the keys up to its last query (t * t for one block)."""
    bounds = sorted({round(i * t / blocks) for i in range(blocks + 1)})
    return sum((hi - lo) * hi for lo, hi in zip(bounds, bounds[1:]))


def env_without_hugepage_settings(**extra: str) -> dict[str, str]:
    """os.environ without GLIBC_TUNABLES / RESEARCH_HUGEPAGES (so a child process decides
    about huge-page malloc on its own, research.training.hugepages), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RESEARCH_HUGEPAGES")}
    return {**env, **extra}


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """Path of a small SentencePiece model (1000 pieces) trained on Austen."""
    from research.data.tokenizer import train_sentencepiece
    prefix = str(tmp_path_factory.mktemp("sp") / "austen1k")
    train_sentencepiece(austen_paragraphs(4000), prefix, vocab_size=1000)
    return prefix + ".model"


@pytest.fixture(autouse=True)
def clean_gin():
    """Every test starts and ends with an empty gin config: bindings parsed by one test (say
    pretrain_causal.gin's make_optimizer.b2 = 0.95) must not leak into the next one that runs
    in the same worker process."""
    gin.clear_config()
    yield
    gin.clear_config()

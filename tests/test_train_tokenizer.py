"""tools/train_tokenizer.py end to end, in a subprocess from the repository root."""

import os
import subprocess
import sys

import pytest

from research.data.tokenizer import Tokenizer
from tests.conftest import ROOT, austen_paragraphs

TOOL = ROOT / "tools" / "train_tokenizer.py"


def run_tool(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # must work uninstalled
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    paragraphs = austen_paragraphs(1500)
    (d / "one.txt").write_text("\n\n".join(paragraphs[:700]))
    (d / "two.txt").write_text("\n\n".join(paragraphs[700:]))
    return d


def test_train_tokenizer_cli(corpus, tmp_path):
    prefix = str(tmp_path / "out" / "sp500")
    args = [f"--input=text:{corpus}/*.txt", "--vocab_size=500", f"--output={prefix}",
            f"--data_dir={tmp_path / 'cache'}", "--max_documents=1000"]
    proc = run_tool(*args)
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(prefix + ".model") and os.path.exists(prefix + ".vocab")
    assert "vocab_size: 500" in proc.stdout
    assert "special ids: pad=0 unk=1 bos=2 eos=3" in proc.stdout
    assert "1000 of 1500 documents" in proc.stdout
    assert "pieces:" in proc.stdout

    tok = Tokenizer(prefix + ".model")
    assert tok.vocab_size == 500
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 3)] == ["[PAD]", "<unk>", "<s>", "</s>"]
    assert {tok.cls_id, tok.sep_id, tok.mask_id} == {4, 5, 6}
    assert tok.mask_id not in tok.encode("a [MASK] b")

    # Refuses to overwrite, leaving the model untouched; --overwrite replaces it.
    mtime = os.stat(prefix + ".model").st_mtime_ns
    proc = run_tool(*args)
    assert proc.returncode != 0
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert os.stat(prefix + ".model").st_mtime_ns == mtime
    proc = run_tool(*args, "--overwrite", "--model_type=bpe")
    assert proc.returncode == 0, proc.stderr


def test_train_tokenizer_bad_input(tmp_path):
    proc = run_tool(f"--input=text:{tmp_path}/none/*.txt", "--vocab_size=500",
                    f"--output={tmp_path}/x")
    assert proc.returncode != 0
    assert "matches no file" in proc.stderr
    assert not os.path.exists(f"{tmp_path}/x.model")


def test_train_tokenizer_help():
    proc = run_tool("--help")
    assert proc.returncode == 0
    for flag in ("--input", "--vocab_size", "--output", "--model_type", "--max_documents",
                 "--text_field", "--overwrite"):
        assert flag in proc.stdout

"""Document sources: local text/jsonl via the cached TFDS builder, tfds: specs, errors."""

import json
import logging
import os

import gin
import pytest
import tensorflow_datasets as tfds

from absl import logging as absl_logging

from research.data.local_builder import LocalCorpus, quiet_tfds, prepare_local_dataset
from research.data.sources import DataSourceError, DocumentList, open_documents
from research.errors import ConfigError, UserError
from tests.conftest import AUSTEN, austen_paragraphs


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "cache")


def write(path, content, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(content)
    return str(path)


def docs_of(source):
    return [source[i] for i in range(len(source))]


def cache_dirs(data_dir):
    root = os.path.join(data_dir, "research_local_documents")
    return sorted(d for d in os.listdir(root)
                  if os.path.exists(os.path.join(root, d, "1.0.0", "dataset_info.json")))


# ------------------------------------------------------------------------- text / jsonl

def test_text_document_boundaries(tmp_path, data_dir):
    write(tmp_path / "b.txt", "\n\n  First of b.\nstill first  \n\n\n \t \nSecond of b.\n")
    write(tmp_path / "a.txt", "Only doc of a,\r\nwith CRLF.\r\n\r\n")
    write(tmp_path / "c.txt", "\n \n\n")  # no documents, but the corpus as a whole has some
    src = open_documents(f"text:{tmp_path}/*.txt", data_dir=data_dir)
    assert docs_of(src) == ["Only doc of a,\r\nwith CRLF.",
                            "First of b.\nstill first", "Second of b."]
    assert len(src) == 3 and src[-1] == "Second of b."
    assert "3 files" in src.name
    with pytest.raises(IndexError):
        src[3]


def test_text_recursive_glob_and_relative_path(tmp_path, data_dir, monkeypatch):
    write(tmp_path / "corpus" / "x" / "y" / "deep.txt", "deep doc")
    write(tmp_path / "corpus" / "top.txt", "top doc")
    monkeypatch.chdir(tmp_path)
    src = open_documents("text:corpus/**/*.txt", data_dir=data_dir)
    assert sorted(docs_of(src)) == ["deep doc", "top doc"]


def test_austen_paragraphs_match_reference(data_dir):
    src = open_documents(f"text:{os.path.dirname(AUSTEN[0])}/*.txt", data_dir=data_dir)
    expected = austen_paragraphs()
    assert len(src) == len(expected)
    for i in (0, 1, 500, len(expected) - 1):
        assert src[i] == expected[i]


def test_jsonl_documents_and_text_field(tmp_path, data_dir):
    write(tmp_path / "d.jsonl", "\n".join([
        json.dumps({"text": "one", "body": "uno"}),
        "",
        json.dumps({"text": "  two\nlines ", "body": "dos"}),
        json.dumps({"text": "   ", "body": "tres"}),  # whitespace-only: dropped
    ]) + "\n")
    assert docs_of(open_documents(f"jsonl:{tmp_path}/*.jsonl", data_dir=data_dir)) == [
        "one", "  two\nlines "]
    assert docs_of(open_documents(f"jsonl:{tmp_path}/*.jsonl", text_field="body",
                                  data_dir=data_dir)) == ["uno", "dos", "tres"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "d.jsonl:2: not valid JSON"),
    ('{"body": "no text"}', "d.jsonl:2: JSON object has no field 'text'"),
    ('["a list"]', "d.jsonl:2: expected a JSON object"),
    ('{"text": 7}', "d.jsonl:2: field 'text' is a int"),
])
def test_jsonl_bad_lines(tmp_path, data_dir, line, message):
    write(tmp_path / "d.jsonl", '{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataSourceError, match=message):
        open_documents(f"jsonl:{tmp_path}/*.jsonl", data_dir=data_dir)


# ---------------------------------------------------------------------------- caching

def test_cache_reused_then_rebuilt_on_change(tmp_path, data_dir, caplog):
    path = write(tmp_path / "a.txt", "alpha\n\nbeta\n")
    spec = f"text:{tmp_path}/*.txt"
    caplog.set_level(logging.INFO, logger="research.data.local_builder")
    assert docs_of(open_documents(spec, data_dir=data_dir)) == ["alpha", "beta"]
    assert "Building local dataset" in caplog.text
    caplog.clear()
    assert docs_of(open_documents(spec, data_dir=data_dir)) == ["alpha", "beta"]
    assert "Reusing cached local dataset" in caplog.text
    assert "Building" not in caplog.text
    assert len(cache_dirs(data_dir)) == 1

    write(path, "alpha\n\nbeta\n\ngamma\n")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    caplog.clear()
    assert docs_of(open_documents(spec, data_dir=data_dir)) == ["alpha", "beta", "gamma"]
    assert "Building local dataset" in caplog.text
    assert len(cache_dirs(data_dir)) == 2

    # A new file matching the glob also changes the key.
    write(tmp_path / "b.txt", "delta")
    assert docs_of(open_documents(spec, data_dir=data_dir))[-1] == "delta"
    assert len(cache_dirs(data_dir)) == 3


TFDS_BUILD_CHATTER = ("Using custom data configuration", "Variant folder",
                      "Downloading and preparing", "downloaded and prepared", "Generating",
                      "Shuffling", "examples/s")


def test_local_build_logs_one_line_of_ours_and_no_tfds_chatter(tmp_path, data_dir, caplog,
                                                               capfd):
    write(tmp_path / "a.txt", "alpha\n\nbeta\n")
    spec = f"text:{tmp_path}/*.txt"
    tfds.display_progress_bar(True)  # as in a fresh process
    caplog.set_level(logging.INFO)
    assert docs_of(open_documents(spec, data_dir=data_dir)) == ["alpha", "beta"]
    assert docs_of(open_documents(spec, data_dir=data_dir)) == ["alpha", "beta"]
    ours = [r.getMessage() for r in caplog.records if r.name == "research.data.local_builder"]
    assert len(ours) == 2
    assert ours[0].startswith("Building local dataset") and data_dir in ours[0]
    assert ours[1].startswith("Reusing cached local dataset") and data_dir in ours[1]
    out, err = capfd.readouterr()
    for chatter in TFDS_BUILD_CHATTER:
        assert chatter not in out + err + caplog.text, chatter


def testquiet_tfds_keeps_real_warnings(caplog):
    caplog.set_level(logging.INFO)
    with quiet_tfds():
        absl_logging.warning("Using custom data configuration: %s", "ours")
        absl_logging.info("Generating dataset %s", "ours")
        absl_logging.warning("A real problem with %s", "the disk")
    absl_logging.info("Outside a build: %s", "kept")
    assert "A real problem with the disk" in caplog.text
    assert "Outside a build: kept" in caplog.text
    assert "custom data configuration" not in caplog.text
    assert "Generating dataset" not in caplog.text


def test_default_data_dir_from_env(tmp_path, monkeypatch):
    write(tmp_path / "in" / "a.txt", "hello")
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path / "envcache"))
    assert docs_of(open_documents(f"text:{tmp_path}/in/*.txt")) == ["hello"]
    assert len(cache_dirs(str(tmp_path / "envcache"))) == 1


def test_split_slicing_on_local_files(tmp_path, data_dir):
    write(tmp_path / "a.txt", "\n\n".join(f"doc {i}" for i in range(10)))
    src = open_documents(f"text:{tmp_path}/*.txt", split="train[:30%]", data_dir=data_dir)
    assert docs_of(src) == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(DataSourceError, match="single split 'train'"):
        open_documents(f"text:{tmp_path}/*.txt", split="validation", data_dir=data_dir)


# ----------------------------------------------------------------------------- errors

def test_glob_matching_no_file(tmp_path, data_dir):
    with pytest.raises(DataSourceError, match="matches no file"):
        open_documents(f"text:{tmp_path}/nothing/*.txt", data_dir=data_dir)
    os.makedirs(tmp_path / "only_a_dir.txt")
    with pytest.raises(DataSourceError, match="matches no file"):
        open_documents(f"text:{tmp_path}/*.txt", data_dir=data_dir)


def test_empty_corpus(tmp_path, data_dir):
    write(tmp_path / "a.txt", "\n  \n\n")
    write(tmp_path / "b.txt", "")
    with pytest.raises(DataSourceError, match="contain no documents"):
        open_documents(f"text:{tmp_path}/*.txt", data_dir=data_dir)
    write(tmp_path / "c.jsonl", '{"text": ""}\n')
    with pytest.raises(DataSourceError, match="contain no documents"):
        open_documents(f"jsonl:{tmp_path}/*.jsonl", data_dir=data_dir)


@pytest.mark.parametrize("spec", ["txt:foo/*.txt", "data/austen/*.txt", "text:", "hf:x"])
def test_unknown_spec(spec):
    with pytest.raises(DataSourceError, match="Unknown document spec"):
        open_documents(spec)


def test_data_errors_are_user_errors(tmp_path):
    """A data mistake ends the CLIs with one `error:` line and exit code 2 (no traceback)."""
    assert issubclass(DataSourceError, ConfigError)
    with pytest.raises(UserError) as caught:
        open_documents(f"text:{tmp_path}/nothing/*.txt")
    assert caught.value.exit_code == 2


def test_unreadable_file(tmp_path, data_dir):
    write(tmp_path / "a.txt", "fine")
    os.symlink(tmp_path / "missing-target", tmp_path / "b.txt")  # broken symlink
    with pytest.raises(DataSourceError, match=r"Cannot read input file .*b\.txt"):
        open_documents(f"text:{tmp_path}/*.txt", data_dir=data_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_permissions(tmp_path, data_dir):
    path = write(tmp_path / "a.txt", "secret")
    os.chmod(path, 0)
    with pytest.raises(DataSourceError, match="Cannot read input file"):
        open_documents(f"text:{tmp_path}/*.txt", data_dir=data_dir)


def test_invalid_utf8_strict_and_skip(tmp_path, data_dir, caplog):
    prefix = b"good one\n\nstill good\n\n"
    write(tmp_path / "a.txt", prefix + b"bad \xff byte\nsame doc\n\nlast good\n", mode="wb")
    spec = f"text:{tmp_path}/*.txt"
    offset = len(prefix) + len(b"bad ")
    with pytest.raises(DataSourceError, match=rf"a\.txt: invalid UTF-8 at byte offset {offset}"):
        open_documents(spec, data_dir=data_dir)
    caplog.set_level(logging.WARNING, logger="research.data.local_builder")
    src = open_documents(spec, data_dir=data_dir, on_decode_error="skip")
    assert docs_of(src) == ["good one", "still good", "last good"]
    assert "Skipped 1 document(s)" in caplog.text
    # The strict mode must not silently reuse the cache built in skip mode.
    with pytest.raises(DataSourceError, match="invalid UTF-8"):
        open_documents(spec, data_dir=data_dir)


def test_invalid_utf8_jsonl(tmp_path, data_dir):
    good = b'{"text": "ok"}\n'
    write(tmp_path / "a.jsonl", good + b'{"text": "caf\xe9"}\n' + good, mode="wb")
    with pytest.raises(DataSourceError,
                       match=rf"a\.jsonl: invalid UTF-8 at byte offset {len(good) + 13}"):
        open_documents(f"jsonl:{tmp_path}/*.jsonl", data_dir=data_dir)
    src = open_documents(f"jsonl:{tmp_path}/*.jsonl", data_dir=data_dir, on_decode_error="skip")
    assert docs_of(src) == ["ok", "ok"]


def test_bad_on_decode_error_value(tmp_path):
    with pytest.raises(DataSourceError, match="on_decode_error='ignore'"):
        open_documents(f"text:{tmp_path}/*.txt", on_decode_error="ignore")


# --------------------------------------------------------------------------------- gin

def test_gin_binding_and_explicit_argument_precedence(tmp_path, data_dir):
    write(tmp_path / "d.jsonl", json.dumps({"text": "from text", "body": "from body"}))
    spec = f"jsonl:{tmp_path}/*.jsonl"
    try:
        gin.parse_config("open_documents.text_field = 'body'")
        assert docs_of(open_documents(spec, data_dir=data_dir)) == ["from body"]
        assert docs_of(open_documents(spec, text_field="text", data_dir=data_dir)) == [
            "from text"]
    finally:
        gin.clear_config()


# -------------------------------------------------------------------------------- tfds

def test_tfds_spec_with_mock_data():
    with tfds.testing.mock_data(num_examples=6):
        src = open_documents("tfds:lm1b:test")
        assert len(src) == 6
        assert all(isinstance(d, str) for d in docs_of(src))
        assert src.name == "tfds:lm1b:test"
        src = open_documents("tfds:imdb_reviews/plain_text:1.0.0", split="train")
        assert len(src) == 6 and isinstance(src[5], str)
        with pytest.raises(DataSourceError, match="has no feature 'body'"):
            open_documents("tfds:imdb_reviews", text_field="body")
        with pytest.raises(DataSourceError, match="give the split in one place"):
            open_documents("tfds:lm1b:test", split="train")


def test_tfds_not_prepared_never_downloads(tmp_path, caplog):
    with pytest.raises(DataSourceError, match="is not prepared"):
        open_documents("tfds:lm1b:test", data_dir=str(tmp_path))
    # A half-made dataset folder (an interrupted `tfds build`): our error, not TFDS's
    # "Variant folder ... has no dataset_info.json" warning, says what to do.
    os.makedirs(tfds.builder("lm1b", data_dir=str(tmp_path)).data_dir)
    caplog.set_level(logging.INFO)
    with pytest.raises(DataSourceError, match="is not prepared"):
        open_documents("tfds:lm1b:test", data_dir=str(tmp_path))
    assert "Variant folder" not in caplog.text


def test_tfds_unknown_dataset(tmp_path):
    with pytest.raises(DataSourceError, match="not found"):
        open_documents("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))


def _prepared_local(tmp_path, file_format):
    paths = [write(tmp_path / "in" / "a.txt", "\n\n".join(f"document {i}" for i in range(7)))]
    corpus = LocalCorpus("text", tuple(paths))
    builder = prepare_local_dataset(corpus, str(tmp_path / "tfds"), file_format=file_format)
    config = builder.builder_config.name
    return f"tfds:research_local_documents/{config}", str(tmp_path / "tfds")


def test_tfds_array_record_random_access(tmp_path):
    spec, tfds_dir = _prepared_local(tmp_path, "array_record")
    src = open_documents(spec, data_dir=tfds_dir)
    assert type(src).__name__ == "TfdsDocuments"
    assert docs_of(src) == [f"document {i}" for i in range(7)]
    assert docs_of(open_documents(spec + ":train[2:4]", data_dir=tfds_dir)) == [
        "document 2", "document 3"]


def test_tfds_tfrecord_fallback_reads_into_memory(tmp_path, caplog):
    spec, tfds_dir = _prepared_local(tmp_path, "tfrecord")
    caplog.set_level(logging.WARNING, logger="research.data.sources")
    src = open_documents(spec, data_dir=tfds_dir)
    assert isinstance(src, DocumentList)
    assert docs_of(src) == [f"document {i}" for i in range(7)]
    assert "file_format='array_record'" in caplog.text

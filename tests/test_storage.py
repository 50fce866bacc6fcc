"""research.storage: the same file operations on a local directory and on gs:// (a real GCS
server on localhost, tests/gcs_emulator.py), and the error for a missing bucket."""

import os

import pytest

from research import storage


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs")


def test_write_read_append_list_glob_remove(root):
    storage.makedirs(root)
    storage.write_text(storage.join(root, "a.txt"), "one\n")
    storage.append_text(storage.join(root, "a.txt"), "two\n")
    storage.append_text(storage.join(root, "a.txt"), "three\n")
    storage.write_bytes(storage.join(root, "sub", "b.bin") if storage.is_remote(root)
                        else _mk(root, "sub", "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a.txt")) == "one\ntwo\nthree\n"
    assert storage.listdir(root) == ["a.txt", "sub"]
    assert storage.isdir(storage.join(root, "sub")) and not storage.isdir(storage.join(root, "a.txt"))
    assert storage.isfile(storage.join(root, "a.txt")) and storage.exists(storage.join(root, "sub", "b.bin"))
    assert storage.getsize(storage.join(root, "sub", "b.bin")) == 2
    assert storage.glob(storage.join(root, "*.txt")) == [storage.resolve(storage.join(root, "a.txt"))]
    assert storage.glob(storage.join(root, "**", "*.bin")) == [storage.resolve(storage.join(root, "sub", "b.bin"))]
    assert storage.glob(storage.join(root, "a.txt")) == [storage.resolve(storage.join(root, "a.txt"))]
    assert storage.glob(storage.join(root, "*.none")) == []
    with storage.open_file(storage.join(root, "a.txt")) as f:
        assert f.read() == b"one\ntwo\nthree\n"
    with storage.local_copy(root) as local:
        assert sorted(os.listdir(local)) == ["a.txt", "sub"]
        with open(os.path.join(local, "sub", "b.bin"), "rb") as f:
            assert f.read() == b"\x00\x01"
    storage.remove(storage.join(root, "a.txt"))
    storage.remove(storage.join(root, "a.txt"))  # missing is fine
    assert storage.listdir(root) == ["sub"]
    storage.rmtree(root)
    assert storage.listdir(root) == [] and not storage.exists(storage.join(root, "sub", "b.bin"))


def _mk(root, *parts):
    os.makedirs(os.path.join(root, *parts[:-1]), exist_ok=True)
    return os.path.join(root, *parts)


def test_append_after_another_writer_reads_existing_object(gcs):
    """A process that appends to an object it did not write first reads what is there."""
    path = storage.join(gcs, "m.jsonl")
    storage.write_text(path, "a\n")
    storage._written.clear()  # as if another process had written it
    storage.append_text(path, "b\n")
    assert storage.read_text(path) == "a\nb\n"


def test_upload_tree(gcs, tmp_path):
    _mk(str(tmp_path), "d", "x", "y.txt")
    with open(tmp_path / "d" / "x" / "y.txt", "w") as f:
        f.write("y")
    storage.upload(str(tmp_path / "d"), storage.join(gcs, "d"))
    assert storage.read_text(storage.join(gcs, "d", "x", "y.txt")) == "y"


def test_missing_bucket_is_one_clear_error(gcs_server):
    with pytest.raises(storage.StorageError, match="bucket 'nobucket' does not exist.*gcloud storage buckets create"):
        storage.check_writable("gs://nobucket/run", "--workdir")
    with pytest.raises(storage.StorageError, match="nobucket"):
        storage.write_text("gs://nobucket/run/x.txt", "x")


def test_paths():
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/x")
    assert not storage.is_remote("file:///tmp/x") and storage.resolve("file:///tmp/x") == "/tmp/x"
    assert storage.join("gs://b/run/", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.resolve("gs://b/run/") == "gs://b/run"
    assert storage.basename("gs://b/run/") == "run" and storage.dirname("gs://b/run/x") == "gs://b/run"
    with pytest.raises(storage.StorageError, match="no filesystem for nosuch://"):
        storage.exists("nosuch://b/x")


def test_status_codes_inside_paths_are_not_taken_for_http_errors(gcs_server):
    """An object id with '403' in it (d70c3403e601) is no 'access denied'; our own errors pass."""
    from research.errors import WorkdirLockedError
    with pytest.raises(WorkdirLockedError):
        with storage.errors("gs://bkt/d70c3403e601/.lock", "write"):
            raise WorkdirLockedError("gs://bkt/d70c3403e601 is in use")
    with pytest.raises(ValueError, match="d70c3403e601"):
        with storage.errors("gs://bkt/d70c3403e601/x", "read"):
            raise ValueError("bad thing at b/bkt/o/d70c3403e601%2Fx")
    with pytest.raises(storage.StorageError, match="access denied on bucket 'bkt'"):
        with storage.errors("gs://bkt/x", "write"):
            raise OSError("Forbidden: 403 caller does not have storage.objects.create")

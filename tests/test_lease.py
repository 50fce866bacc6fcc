"""research.lease on a real GCS server (tests/gcs_emulator.py): one holder at a time, a stale
lease is taken over with a message, a lost lease is noticed, release frees it."""

import json
import logging
import time

import pytest

from research import lease as lease_lib
from research import storage
from research import workdir as workdir_lib
from research.errors import WorkdirLockedError


def test_second_taker_is_refused_until_release(gcs):
    url = storage.join(gcs, ".lock")
    first = lease_lib.Lease(url, ttl_s=60)
    first.acquire()
    try:
        assert lease_lib.lease_held(url)
        content = json.loads(storage.read_text(url))
        assert content["owner"] == first.owner and content["ttl_s"] == 60
        with pytest.raises(WorkdirLockedError, match=r"in use by another training run \(pid="):
            lease_lib.Lease(url).acquire()
    finally:
        first.release()
    assert not storage.exists(url) and not lease_lib.lease_held(url)
    second = lease_lib.Lease(url)
    second.acquire()
    second.release()


def test_expired_lease_of_a_killed_run_is_taken_over_with_a_warning(gcs, caplog):
    url = storage.join(gcs, ".lock")
    storage.write_text(url, json.dumps({"owner": "dead", "holder": "pid=1 host=gone",
                                        "heartbeat": time.time() - 100, "ttl_s": 30}))
    assert not lease_lib.lease_held(url)
    lease = lease_lib.Lease(url, ttl_s=30)
    with caplog.at_level(logging.WARNING):
        lease.acquire()
    try:
        assert "taking over the lease" in caplog.text and "pid=1 host=gone" in caplog.text
        assert json.loads(storage.read_text(url))["owner"] == lease.owner
    finally:
        lease.release()


def test_a_fresh_lease_is_not_taken_over(gcs):
    url = storage.join(gcs, ".lock")
    storage.write_text(url, json.dumps({"owner": "other", "holder": "pid=7 host=h",
                                        "heartbeat": time.time() - 5, "ttl_s": 30}))
    with pytest.raises(WorkdirLockedError, match=r"pid=7 host=h.*expires 2\d s after"):
        lease_lib.Lease(url).acquire()


def test_heartbeat_renews_and_notices_a_takeover(gcs):
    url = storage.join(gcs, ".lock")
    lease = lease_lib.Lease(url, ttl_s=0.4)
    lease.acquire()
    try:
        beat = json.loads(storage.read_text(url))["heartbeat"]
        deadline = time.time() + 10
        while json.loads(storage.read_text(url))["heartbeat"] == beat and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads(storage.read_text(url))["heartbeat"] > beat  # renewed
        lease.check()
        storage.write_text(url, json.dumps({"owner": "thief", "holder": "x",
                                            "heartbeat": time.time(), "ttl_s": 60}))
        while not lease.lost and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(WorkdirLockedError, match="took over this run's lease"):
            lease.check()
    finally:
        lease.release()
    assert json.loads(storage.read_text(url))["owner"] == "thief"  # not deleted by the loser


def test_workdir_lock_and_lock_held_on_gcs(gcs):
    with workdir_lib.WorkdirLock(gcs) as lock:
        assert lock.lease is not None and workdir_lib.lock_held(gcs)
        with pytest.raises(WorkdirLockedError):
            workdir_lib.WorkdirLock(gcs).acquire()
    assert not workdir_lib.lock_held(gcs)


def test_metrics_append_and_truncate_on_gcs(gcs):
    for step in (1, 2, 3):
        workdir_lib.append_metrics(gcs, {"step": step, "loss": float(step)})
    workdir_lib.truncate_metrics(gcs, 2)
    workdir_lib.append_metrics(gcs, {"step": 3, "loss": 9.0})
    assert workdir_lib.read_metrics(gcs) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                                             {"step": 3, "loss": 9.0}]

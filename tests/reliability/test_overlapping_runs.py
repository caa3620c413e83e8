"""Overlapping runs: a run that fires while another run of the same name still works waits or does
nothing, and every round is committed once.

The guard is the run lease (:mod:`storage.lease`, taken by :mod:`flows.leases`): generation
objects created exclusively in the store, on local disk and on S3 alike. First the lease itself
(contending threads, a holder process that died, a holder that stalled past its TTL), then the
flows: a stage-1 run holds its round while a scheduled ``data-engine`` run fires (it stops at
once, having written nothing) and a second stage-1 run waits for it (and then reuses every round
the first one finished: no second commit, no second model version).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flows.config import EngineConfig
from storage.errors import LeaseHeldError
from storage.lease import Lease
from storage.location import StorageLocation
from storage.mask_store import MaskStore
from tests.fixtures.s3 import StoreRoot
from tests.flows.conftest import tiny_engine_config

_REPO = Path(__file__).resolve().parents[2]


def _generations(location: StorageLocation, name: str) -> list[str]:
    return location.list(f"leases/{name}", include_hidden=True)


# --- the lease -----------------------------------------------------------------------------------


def test_contending_threads_hold_the_lease_one_at_a_time(store_root: StoreRoot) -> None:
    location = StorageLocation(store_root.root, endpoint_url=store_root.endpoint_url)
    spans: list[tuple[float, float, int]] = []
    waits: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        start.wait()
        for _ in range(2):
            lease = Lease(location, "run-contended", ttl_s=30, wait_s=60, poll_s=0.02)
            with lease:
                entered = time.monotonic()
                time.sleep(0.05)
                left = time.monotonic()
            with lock:
                spans.append((entered, left, n))
                waits.append(lease.waited_s)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    spans.sort()
    assert len(spans) == 8  # 4 contenders x 2 turns, every one served
    overlaps = [(a, b) for a, b in itertools.pairwise(spans) if b[0] < a[1]]
    assert overlaps == []  # never two holders at once
    assert max(waits) > 0.05  # someone waited out at least one whole turn of another
    state = Lease(location, "run-contended").state()
    assert state is not None and state.released
    # Each turn is an acquire and a release (heartbeats too slow to fire): 16 generations, of
    # which only the newest is kept.
    assert state.generation >= 16
    assert len(_generations(location, "run-contended")) == 1


def test_a_run_that_does_not_wait_is_refused_naming_the_holder(store_root: StoreRoot) -> None:
    location = StorageLocation(store_root.root, endpoint_url=store_root.endpoint_url)
    with Lease(location, "run-engine", ttl_s=30) as holder:
        before = _generations(location, "run-engine")
        second = Lease(location, "run-engine", ttl_s=30, wait_s=0)
        with pytest.raises(LeaseHeldError) as caught:
            second.acquire()
        message = str(caught.value)
        assert f"pid {os.getpid()}" in message and "run-engine" in message
        assert "nothing was done" in message
        assert _generations(location, "run-engine") == before  # the refused run wrote nothing
        assert holder.held and not second.held
        holder.check()


_HOLDER = """
import sys, time
from storage.errors import LeaseLostError
from storage.lease import Lease
from storage.location import StorageLocation

lease = Lease(StorageLocation(sys.argv[1]), "run-engine", ttl_s=float(sys.argv[2]))
lease.acquire()
print("held", flush=True)
if sys.argv[3] == "die":
    import os
    os._exit(0)  # no release, no clean-up: a killed run
while True:
    time.sleep(0.05)
    try:
        lease.check()
    except LeaseLostError as err:
        print("lost:", err, flush=True)
        sys.exit(3)
"""


def _holder(root: str, ttl_s: float, mode: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, root, str(ttl_s), mode],
        cwd=_REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "held", line
    return process


def test_the_lease_of_a_process_that_died_is_taken_at_once(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    dead = _holder(root, ttl_s=600, mode="die")
    assert dead.wait(timeout=30) == 0
    lease = Lease(StorageLocation(root), "run-engine", ttl_s=30, wait_s=0)
    lease.acquire()  # not expired for another 10 minutes, but its process is gone
    try:
        assert lease.held and lease.waited_s < 1.0
    finally:
        lease.release()


def test_a_stalled_holder_loses_its_lease_after_the_ttl_and_is_told(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    stalled = _holder(root, ttl_s=1.0, mode="loop")
    try:
        os.kill(stalled.pid, signal.SIGSTOP)  # alive, but neither working nor renewing
        taker = Lease(StorageLocation(root), "run-engine", ttl_s=30, wait_s=20, poll_s=0.05)
        taker.acquire()
        os.kill(stalled.pid, signal.SIGCONT)
        output, _ = stalled.communicate(timeout=30)
    finally:
        if stalled.poll() is None:
            os.kill(stalled.pid, signal.SIGCONT)
            stalled.kill()
            stalled.wait()
    try:
        # It waited for the expiry (1 s after the last renewal), not for a dead process.
        assert 0.2 < taker.waited_s < 5.0, taker.waited_s
        assert stalled.returncode == 3 and "expired and was taken over" in output, output
        taker.check()  # the new holder keeps it
    finally:
        taker.release()


# --- the flows -----------------------------------------------------------------------------------


def test_the_scheduled_deployment_runs_one_at_a_time(tmp_path: Path) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows.deployments import build_deployments

    engine, *stages = build_deployments(_config(tmp_path / "root"), cron="*/5 * * * *")
    # Prefect cancels a scheduled run that comes due while the last one still runs; the stage
    # deployments (on demand) have no such limit and meet the run lease instead.
    assert engine.concurrency_limit == 1
    assert engine.concurrency_options is not None
    assert engine.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert [d.concurrency_limit for d in stages] == [None, None, None]


def _config(root: Path, **lease: Any) -> EngineConfig:
    return tiny_engine_config(
        root,
        source={"holdout_images": 1, "image_size": 64},
        evaluation={"max_objects_per_image": 1},
        stage1={"rounds": 2, "images_per_round": 1},
        stage2={"rounds": 1, "images_per_round": 1},
        stage3={"rounds": 1, "images_per_round": 1},
        lease={"ttl_s": 30.0, "poll_s": 0.2, **lease},
    )


class _Run(threading.Thread):
    """A flow run in a thread: its return value or its exception."""

    def __init__(self, fn: Any, config: EngineConfig) -> None:
        super().__init__(daemon=True)
        self.fn, self.config = fn, config
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(self.config)
        except BaseException as err:  # reported by the test
            self.error = err


def _wait_for_holder(location: StorageLocation, run: _Run) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = Lease(location, "run-engine").state()
        if state is not None and not state.released:
            return
        assert run.is_alive(), f"the first run ended before holding its lease: {run.error!r}"
        time.sleep(0.05)
    pytest.fail("the first run never took its lease")


class _WaitingSeen(logging.Handler):
    """Sets ``event`` when a lease logs that it waits for its holder."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__(logging.INFO)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting up to" in record.getMessage():
            self.event.set()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_overlapping_runs_of_a_round_commit_it_once(
    prefect_harness: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import flows.stages
    from flows.engine import data_engine
    from flows.stages import stage1_assisted_manual

    # The overlap is made certain, not left to timing: the first run holds its last round until
    # the second run has logged that it waits for the lease (the lease itself is not touched).
    second_waits = threading.Event()
    handler = _WaitingSeen(second_waits)
    lease_log = logging.getLogger("storage.lease")
    caplog.set_level(logging.INFO, logger="storage.lease")  # setLevel: clears the level cache
    monkeypatch.setattr(lease_log, "handlers", [*lease_log.handlers, handler])
    run_round = flows.stages._run_round

    def held_round(config: EngineConfig, dataset: str, stage: int, round: int, version: str) -> Any:
        if threading.current_thread() is first and round == config.stage(stage).rounds - 1:
            assert second_waits.wait(timeout=300), "the second run never waited for the lease"
            time.sleep(1.0)
        return run_round(config, dataset, stage, round, version)

    monkeypatch.setattr(flows.stages, "_run_round", held_round)

    root = tmp_path / "root"
    first = _Run(stage1_assisted_manual, _config(root))
    first.start()
    store = MaskStore(str(root))
    _wait_for_holder(store.location, first)

    # A scheduled run of the whole engine fires while stage 1 works: it stops, doing nothing.
    commits_before = [c.sequence for c in store.commits()]
    files_before = [k for k in store.location.list("") if not k.startswith("leases/")]
    started = time.monotonic()
    with pytest.raises(LeaseHeldError, match="run-engine"):
        data_engine(_config(root, wait_s=0.0))
    refused_in = time.monotonic() - started
    assert first.is_alive(), "the first run finished too early to overlap"
    assert [c.sequence for c in store.commits()][: len(commits_before)] == commits_before
    assert not set(files_before) - set(store.location.list(""))

    # A second stage-1 run of the same name, willing to wait: it waits, then reuses.
    second = _Run(stage1_assisted_manual, _config(root, wait_s=600.0))
    second.start()
    first.join(timeout=600)
    second.join(timeout=600)
    assert first.error is None and second.error is None, (first.error, second.error)
    one, two = first.result, second.result

    assert [r.reused for r in one.rounds] == [False, False]
    assert [r.reused for r in two.rounds] == [True, True]  # nothing run twice
    assert two.lease_wait_s > 0.5 and one.lease_wait_s < 0.5
    assert two.final_version == one.final_version
    assert [r.masks for r in two.rounds] == [r.masks for r in one.rounds]

    store = MaskStore(str(root))
    per_round = Counter(
        (c.stage, c.round) for c in store.commits() if c.run_id == "engine" and c.files
    )
    assert per_round == {(1, 0): 1, (1, 1): 1}  # one commit per round
    cards = [json.loads(p.read_text()) for p in sorted((root / "models").glob("v*/card.json"))]
    made_for = Counter(
        (c["extra"].get("role"), c["extra"].get("stage"), c["extra"].get("round")) for c in cards
    )
    assert made_for == {("base", None, None): 1, ("retrain", 1, 0): 1, ("retrain", 1, 1): 1}
    state = Lease(store.location, "run-engine").state()
    assert state is not None and state.released
    print(
        f"refused in {refused_in:.2f} s; second run waited {two.lease_wait_s:.1f} s; "
        f"commits per round {dict(per_round)}; versions {len(cards)}"
    )

"""Faults that must lose nothing: killed writers, racing writers, a network that drops uploads.

Issue 9, scenarios 1-4. Every fault is real: a writer process is SIGKILLed by this process, two
processes race for the same commit number, a TCP proxy resets S3 connections. Where a kill has
to land at an exact point, the child process pauses itself there through a *seam* (a wrapper
around one I/O call, installed before the real command runs) and this process kills it; the code
under test (MaskStore, the CLI, the registry) is never replaced.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from engine.builder import build_sam
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.evaluation.metrics import InteractiveMetrics
from engine.registry import ModelRegistry
from engine.synthetic import write_synthetic_dataset
from flows.cli import build_app
from storage import rle
from storage.errors import StorageError
from storage.mask_store import ImageRecord, MaskRecord, MaskStore
from tests.fixtures.s3 import S3Root, StoreRoot

_REPO = Path(__file__).resolve().parents[2]

# Installed in a child process before its real work. FAULT_POINT names where it pauses (prints
# "PAUSED ..." and sleeps) so that the parent can SIGKILL it exactly there:
#   before-put:<key>            before StorageLocation.put_bytes(<key>) (earlier files written)
#   half-write:<prefix>:<n>     the n-th local temp file under <prefix>: half its bytes written
#   barrier:<folder>:<n>        not a pause: the first commit PUT waits until n processes reach
#                               theirs, so that they race for the same sequence number
#   none                        no pause
_SEAMS = textwrap.dedent(
    """
    import builtins, os, sys, time
    import storage.location as location

    def pause(where):
        print(f"PAUSED {where}", flush=True)
        time.sleep(600)

    kind, _, arg = os.environ.get("FAULT_POINT", "none").partition(":")
    put_bytes = location.StorageLocation.put_bytes
    commit_attempts = []
    if kind == "before-put":
        def paused_put(self, key, data, *, exclusive=False):
            if key == arg:
                pause(key)
            put_bytes(self, key, data, exclusive=exclusive)
        location.StorageLocation.put_bytes = paused_put
    elif kind == "barrier":
        folder, _, parties = arg.rpartition(":")
        def racing_put(self, key, data, *, exclusive=False):
            if key.startswith("_commits/"):
                commit_attempts.append(key)
                if len(commit_attempts) == 1:
                    open(os.path.join(folder, str(os.getpid())), "w").close()
                    deadline = time.monotonic() + 60
                    while len(os.listdir(folder)) < int(parties) and time.monotonic() < deadline:
                        time.sleep(0.001)
            put_bytes(self, key, data, exclusive=exclusive)
        location.StorageLocation.put_bytes = racing_put
    elif kind == "half-write":
        prefix, _, nth = arg.rpartition(":")
        opened = []
        class HalfWritten:
            def __init__(self, file, path):
                self.file, self.path = file, path
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                self.file.close()
            def write(self, data):
                self.file.write(data[: len(data) // 2])
                self.file.flush()
                pause(f"{self.path} {len(data) // 2}/{len(data)}")
        def half_open(path, mode="r", *args, **kwargs):
            file = builtins.open(path, mode, *args, **kwargs)
            if "w" in mode and f"/{prefix}" in str(path) and ".tmp-" in str(path):
                opened.append(path)
                if len(opened) == int(nth):
                    return HalfWritten(file, path)
            return file
        location.open = half_open
    """
)


def _run_child(code: str, args: list[str], fault: str, tmp_path: Path) -> tuple[int, str]:
    """Run ``_SEAMS + code`` with ``args``; SIGKILL it when it pauses. Returns (rc, stdout)."""
    # One torch thread: two would oversubscribe the shared cores (and cost 5x the time here).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_POINT": fault}
    lines = []
    with (
        open(tmp_path / "child-stderr.txt", "w") as stderr,
        subprocess.Popen(
            [sys.executable, "-c", _SEAMS + textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=_REPO,
            env=env,
        ) as proc,
    ):
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("PAUSED"):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:  # this test failed first: do not leave the child behind
                proc.kill()
    if rc not in (0, -signal.SIGKILL):
        raise AssertionError((tmp_path / "child-stderr.txt").read_text())
    return rc, "".join(lines)


def _check_half_written(out: str) -> str:
    """The temp file a ``half-write`` pause names holds half its bytes; returns "n/m bytes"."""
    paused = re.search(r"PAUSED (\S+) (\d+)/(\d+)", out)
    assert paused is not None, out
    path, written, total = paused.group(1), int(paused.group(2)), int(paused.group(3))
    assert os.path.getsize(path) == written < total
    return f"{written}/{total} bytes"


# ------------------------------------------------------------------------------------ scenario 1

_AMG_CLI = """
sys.argv = ["data-engine", *sys.argv[1:]]
from flows.cli import main
main()
"""
_AMG_SUMMARY = re.compile(r"(\d+) masks generated, (\d+) written, (\d+) already stored")


@pytest.fixture(scope="module")
def amg_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random tiny SAM (64 px input) whose masks are many, varied and quick to make.

    Without the instance code: a random code's click term answers many points alike."""
    torch.manual_seed(0)
    model = build_sam("tiny", image_size=64, instance_dim=0)
    with torch.no_grad():  # sharper logits: random weights otherwise give one blob per image
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40.0)
            mlp.layers[-1].bias.mul_(40.0)
    path = tmp_path_factory.mktemp("model") / "tiny64.pt"
    save_checkpoint(model, str(path), version="fault-v1")
    return str(path)


def test_stage3_writer_killed_mid_write_commits_each_mask_once(
    amg_checkpoint: str, tmp_path: Path
) -> None:
    """`data-engine amg` killed twice mid-write, then rerun: every mask once, gc cleans up."""
    started = time.perf_counter()
    images, root = tmp_path / "images", str(tmp_path / "store")
    write_synthetic_dataset(images, 6, seed=3, size=(48, 64))
    args = ["amg", "--model", amg_checkpoint, "--images", str(images), "--root", root]
    # No filters and no NMS: the 48 masks per image (16 points x 3) of this model all differ.
    args += ["--run-id", "r1", "--batch-size", "2", "--points-per-side", "4"]
    args += ["--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--box-nms-thresh", "1"]

    # Run 1 dies with batch 2's data file written and its commit not.
    rc, _ = _run_child(_AMG_CLI, args, "before-put:_commits/0000000002.json", tmp_path)
    assert rc == -signal.SIGKILL
    store = MaskStore(root)
    visible_1 = store.masks()["mask_id"].to_pylist()
    assert [c.sequence for c in store.commits()] == [1]
    assert len(visible_1) == len(set(visible_1)) == store.commits()[0].counts["masks"] == 2 * 48
    assert len(store.location.list("masks")) == 2  # one committed file and one orphan

    # Run 2 commits batch 2, then dies half-way through writing batch 3's data file.
    rc, out = _run_child(_AMG_CLI, args, "half-write:masks/:2", tmp_path)
    assert rc == -signal.SIGKILL
    torn = _check_half_written(out)
    store = MaskStore(root)
    visible_2 = store.count_masks()
    assert [c.sequence for c in store.commits()] == [1, 2] and visible_2 == 4 * 48
    temps = [k for k in store.location.list("masks", include_hidden=True) if ".tmp-" in k]
    assert len(temps) == 1 and len(store.location.list("masks")) == 3

    # Run 3 completes: only batch 3 is new. It runs the same command in this process (saving a
    # torch import), on one thread like the children, so that its masks are bit-identical.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(build_app(), args)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    summary = _AMG_SUMMARY.search(result.output)
    assert summary is not None, result.output
    generated, written, already = (int(g) for g in summary.groups())
    # The rerun regenerated every mask with the same id: the 192 committed ones were recognised.
    assert (generated, written, already) == (6 * 48, 2 * 48, 4 * 48)
    store = MaskStore(root)
    table = store.masks()
    ids = table["mask_id"].to_pylist()
    assert [c.sequence for c in store.commits()] == [1, 2, 3]
    assert len(ids) == len(set(ids)) == generated
    per_image = table.group_by("image_id").aggregate([("mask_id", "count")])
    assert sorted(per_image["mask_id_count"].to_pylist()) == [48] * 6

    # The orphan and the torn temp file were never read; `data-engine gc` removes exactly them.
    referenced = {k for c in store.commits() for k in c.files}
    orphans = set(store.location.list("masks", include_hidden=True)) - referenced
    assert len(orphans) == 2
    result = CliRunner().invoke(build_app(), ["gc", "--root", root])
    assert result.exit_code == 0, result.output
    assert "gc: 2 file(s) deleted" in result.output
    assert {line.split()[-1] for line in result.output.splitlines()[:-1]} == orphans
    assert set(store.location.list("masks", include_hidden=True)) == referenced
    direct = pads.dataset(f"{root}/masks", partitioning="hive").to_table()
    assert direct.num_rows == generated == MaskStore(root).count_masks()
    print(
        f"scenario 1: {generated} masks in 3 commits; visible after kill 1: {len(visible_1)}, "
        f"after kill 2 ({torn} of a data file on disk): {visible_2}; final run generated "
        f"{generated}, wrote {written}, skipped {already}; gc removed {len(orphans)} files; "
        f"{time.perf_counter() - started:.1f} s"
    )


# ------------------------------------------------------------------------------------ scenario 2

_OLD_METRICS = InteractiveMetrics(0.70, 0.85, 3.0, 4.5, 0.80, images=4, objects=20)
_NEW_METRICS = InteractiveMetrics(0.75, 0.88, 2.5, 4.0, 0.82, images=4, objects=20)

_REGISTER = """
import json
import torch
from engine.builder import build_sam
from engine.registry import ModelRegistry
from storage.mask_store import MaskStore

torch.manual_seed(1)
registry = ModelRegistry(MaskStore(sys.argv[1]))
model = build_sam("tiny", image_size=64)
card = registry.register(model, parent="v0001", metrics=json.loads(sys.argv[2]))
registry.promote(card.version)
print("DONE", card.version, flush=True)
"""


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_sam("tiny", image_size=64)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("fault", "paused_at", "listed", "temps", "next_version"),
    [
        # half of the new checkpoint's bytes are in its temp file
        ("half-write:models/:1", ".checkpoint.pt.tmp-", ["v0001"], 1, "v0002"),
        # the checkpoint is whole under its name, its card not written: v0002 is spent
        ("before-put:models/v0002/card.json", "card.json", ["v0001"], 0, "v0003"),
        # registered; half of the promoted card's bytes are in its temp file
        ("half-write:models/:3", ".card.json.tmp-", ["v0001", "v0002"], 1, "v0002"),
    ],
    ids=["mid-checkpoint", "before-card", "mid-promotion"],
)
def test_registry_killed_while_saving_keeps_a_whole_version(
    tmp_path: Path, fault: str, paused_at: str, listed: list[str], temps: int, next_version: str
) -> None:
    """SIGKILL while a new version is written: the registry serves the old one, whole."""
    started = time.perf_counter()
    root = str(tmp_path / "store")
    registry = ModelRegistry(MaskStore(root))
    old, new = _tiny(0), _tiny(1)
    registry.promote(registry.register(old, metrics=_OLD_METRICS).version)

    metrics = json.dumps(_NEW_METRICS.to_dict())
    rc, out = _run_child(_REGISTER, [root, metrics], fault, tmp_path)
    assert rc == -signal.SIGKILL and paused_at in out, out
    torn = _check_half_written(out) if fault.startswith("half-write") else "none"

    registry = ModelRegistry(MaskStore(root))
    assert [c.version for c in registry.versions()] == listed
    assert registry.latest().version == "v0001"
    assert _same_weights(registry.load("latest"), old)
    # No file under its final name is torn: every checkpoint there loads, every card parses.
    store = registry.store
    checkpoints = [k for k in store.list_objects("models") if k.endswith("checkpoint.pt")]
    for key in checkpoints:
        load_checkpoint(store.location.uri(key))
    hidden = [k for k in store.location.list("models", include_hidden=True) if ".tmp-" in k]
    assert len(hidden) == temps
    assert store.gc() == hidden

    # Finish the job: the new version registers (or, if registered, promotes) and serves.
    card = (
        registry.get("v0002")
        if "v0002" in listed
        else registry.register(new, parent="v0001", metrics=_NEW_METRICS)
    )
    card = registry.promote(card.version)
    assert card.version == next_version and card.promoted
    assert registry.latest().version == next_version
    assert _same_weights(registry.load("latest"), new)
    print(
        f"scenario 2 [{paused_at.strip('.')}]: torn temp {torn}; {len(checkpoints)} whole "
        f"checkpoint(s) loaded, {len(hidden)} temp file(s) removed by gc; new version "
        f"{next_version}; "
        f"{time.perf_counter() - started:.1f} s"
    )


# ------------------------------------------------------------------------------------ scenario 3

_N_UNION, _N_EACH = 90, 60  # writer A: masks 0..59, writer B: 30..89 (30 shared)

_RACING_WRITER = """
import numpy as np
from storage import rle
from storage.mask_store import MaskRecord, MaskStore

root, endpoint, first = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
masks = np.random.default_rng(7).random((N_UNION, 16, 20)) < 0.3
records = [
    MaskRecord("img0", r, 3, 2, "auto", "round-2")
    for r in rle.encode(masks[first : first + N_EACH])
]
store = MaskStore(root, endpoint_url=endpoint)
info = store.write_masks(records, stage=3, round=2, run_id="round-2")
print("COMMIT", info.sequence, info.counts["masks"], info.counts["skipped"], len(commit_attempts))
# Skip interpreter teardown: Arrow's thread pools now and then abort there, after all the work
# is done ("terminate called without an active exception", apache/arrow#34314).
sys.stdout.flush()
os._exit(0)
""".replace("N_UNION", str(_N_UNION)).replace("N_EACH", str(_N_EACH))


def test_two_writers_racing_for_one_commit_both_land_once(
    store_root: StoreRoot, tmp_path: Path
) -> None:
    """Two processes commit overlapping batches of one round at the same instant."""
    started = time.perf_counter()
    store = MaskStore(store_root.root, endpoint_url=store_root.endpoint_url)
    store.add_images([ImageRecord("img0", "/nowhere/img0.png", 20, 16, "0" * 64)])
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    fault = f"barrier:{barrier}:2"
    script = [sys.executable, "-c", _SEAMS + textwrap.dedent(_RACING_WRITER), store_root.root]
    env = {**os.environ, "FAULT_POINT": fault}
    procs = [
        subprocess.Popen(
            [*script, store_root.endpoint_url or "", str(first)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=_REPO,
            env=env,
        )
        for first in (0, _N_UNION - _N_EACH)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    results = [[int(v) for v in out.split()[1:]] for out, _ in outputs]
    # [sequence, masks written, skipped, commit attempts] of each writer, winner first.
    winner, loser = sorted(results)
    assert winner == [1, _N_EACH, 0, 1]
    assert loser == [2, _N_UNION - _N_EACH, 2 * _N_EACH - _N_UNION, 2]

    reader = MaskStore(store_root.root, endpoint_url=store_root.endpoint_url)
    ids = reader.masks(round=2)["mask_id"].to_pylist()
    assert len(ids) == len(set(ids)) == _N_UNION
    assert [c.sequence for c in reader.commits()] == [1, 2]
    # The loser deleted the data file of its lost attempt: nothing for gc.
    assert len(reader.location.list("masks")) == 2 and reader.gc() == []
    print(
        f"scenario 3 [{store_root.kind}]: winner {winner}, loser {loser} "
        f"([sequence, written, skipped, commit attempts]); {len(ids)} rows; "
        f"{time.perf_counter() - started:.1f} s"
    )


# ------------------------------------------------------------------------------------ scenario 4

_PASS, _CUT, _LOSE_RESPONSE = "pass", "cut", "lose-response"


class _FlakyProxy:
    """A TCP proxy in front of an HTTP server that breaks chosen requests.

    ``decide(method, path)`` is asked once per request and answers ``_PASS``, ``_CUT`` (forward
    the head and half the body, then reset both connections: the upload dies mid-body) or
    ``_LOSE_RESPONSE`` (forward the whole request, then reset the client's connection instead
    of passing the response on: the server acted, the client cannot know).
    ``requests`` records ``(method, path, action)`` in order.
    """

    def __init__(self, upstream: str, decide: Callable[[str, str], str]) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._decide = decide
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.requests: list[tuple[str, str, str]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._start(self._accept)

    def close(self) -> None:
        # shutdown() wakes the threads blocked in accept() or recv(); then they can be joined.
        with self._lock:
            sockets, threads = [self._listener, *self._sockets], list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=10)
        for sock in sockets:
            sock.close()

    def count(self, action: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r[2] == action)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            lose = threading.Event()
            self._start(self._client_to_server, client, upstream, lose)
            self._start(self._server_to_client, upstream, client, lose)

    def _client_to_server(
        self, client: socket.socket, upstream: socket.socket, lose: threading.Event
    ) -> None:
        reader = _HttpReader(client)
        with contextlib.suppress(OSError):
            while (head := reader.head()) is not None:
                method, path = head.split(b" ", 2)[:2]
                with self._lock:
                    action = self._decide(method.decode(), path.decode())
                    self.requests.append((method.decode(), path.decode(), action))
                upstream.sendall(head)  # before the body: the client may wait for 100-continue
                body = reader.body(head)
                if body is None:
                    break
                if action == _CUT:
                    upstream.sendall(body[: len(body) // 2])
                    _reset(client, upstream)
                    return
                if action == _LOSE_RESPONSE:
                    lose.set()  # before the server can answer
                upstream.sendall(body)
            upstream.shutdown(socket.SHUT_WR)

    def _server_to_client(
        self, upstream: socket.socket, client: socket.socket, lose: threading.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if lose.is_set():
                    # Pass "100 Continue" on; anything after it is the response to lose.
                    while data.startswith(b"HTTP/1.1 100") and b"\r\n\r\n" in data:
                        end = data.index(b"\r\n\r\n") + 4
                        client.sendall(data[:end])
                        data = data[end:]
                    if data:
                        _reset(client, upstream)
                        return
                    continue
                client.sendall(data)
            client.shutdown(socket.SHUT_WR)


class _HttpReader:
    """Reads HTTP/1.1 requests off a socket: heads, and bodies by length or chunked."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def head(self) -> bytes | None:
        return self._until(b"\r\n\r\n")

    def body(self, head: bytes) -> bytes | None:
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        fields = {k.strip().lower(): v.strip().lower() for k, v in fields.items()}
        if b"chunked" not in fields.get(b"transfer-encoding", b""):
            return self._exact(int(fields.get(b"content-length", b"0")))
        raw = b""
        while (line := self._until(b"\r\n")) is not None:
            raw += line
            size = int(line.split(b";")[0], 16)
            if size == 0:  # then trailers, up to an empty line
                while (line := self._until(b"\r\n")) not in (None, b"\r\n"):
                    raw += line
                return None if line is None else raw + line
            chunk = self._exact(size + 2)
            if chunk is None:
                return None
            raw += chunk
        return None

    def _until(self, mark: bytes) -> bytes | None:
        while mark not in self._buffer:
            if not self._fill():
                return None
        end = self._buffer.index(mark) + len(mark)
        out, self._buffer = self._buffer[:end], self._buffer[end:]
        return out

    def _exact(self, n: int) -> bytes | None:
        while len(self._buffer) < n:
            if not self._fill():
                return None
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def _fill(self) -> bool:
        data = self._sock.recv(65536)
        self._buffer += data
        return bool(data)


def _reset(client: socket.socket, upstream: socket.socket) -> None:
    # SO_LINGER 0 turns the close into a TCP RST: the client sees "connection reset".
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    for sock in (client, upstream):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    client.close()


@contextlib.contextmanager
def _flaky_proxy(upstream: str, decide: Callable[[str, str], str]) -> Iterator[_FlakyProxy]:
    proxy = _FlakyProxy(upstream, decide)
    try:
        yield proxy
    finally:
        proxy.close()


def _uploads(method: str, path: str) -> bool:
    """Requests that carry a body: PutObject, UploadPart, Complete/CreateMultipartUpload."""
    return method in ("PUT", "POST")


def _write_batches(store: MaskStore, batches: int, per_batch: int) -> list[int]:
    """Commit ``batches`` batches of distinct stage-3 masks; returns their commit sequences."""
    masks = np.random.default_rng(11).random((batches * per_batch, 16, 20)) < 0.3
    records = [MaskRecord("img0", r, 3, 0, "auto", "net") for r in rle.encode(masks)]
    return [
        store.write_masks(records[i : i + per_batch], stage=3, round=0, run_id="net").sequence
        for i in range(0, len(records), per_batch)
    ]


def _check_bucket_is_whole(s3_root: S3Root, rows: int) -> int:
    """Straight from the server: every object is whole, committed and counted once.

    Returns how many multipart uploads were left incomplete (a retried CreateMultipartUpload
    whose first response was lost): they are not objects, so no listing or read sees them.
    """
    store = MaskStore(s3_root.root, endpoint_url=s3_root.endpoint_url)
    commits = store.commits()
    assert [c.sequence for c in commits] == list(range(1, len(commits) + 1))
    referenced = {k for c in commits for k in c.files}
    assert set(store.location.list("masks", include_hidden=True)) == referenced
    for commit in commits:  # each data file parses and holds what its commit says
        for key in commit.files:
            table = pq.read_table(pa.BufferReader(store.location.get_bytes(key)))
            assert table.num_rows == commit.counts["masks"]
    ids = store.masks()["mask_id"].to_pylist()
    assert len(ids) == len(set(ids)) == rows
    assert store.gc() == []
    client = boto3.client("s3", endpoint_url=s3_root.endpoint_url)
    listed = client.list_objects_v2(Bucket=s3_root.bucket)["Contents"]
    assert {o["Key"].split("/", 1)[1] for o in listed} == set(store.location.list(""))
    return len(client.list_multipart_uploads(Bucket=s3_root.bucket).get("Uploads", []))


def test_s3_uploads_reset_mid_body_are_retried(s3_root: S3Root) -> None:
    """Every third upload's connection is reset half-way through its body; nothing is lost."""
    started = time.perf_counter()
    uploads = itertools.count(1)

    def cut_every_third_upload(method: str, path: str) -> str:
        return _CUT if _uploads(method, path) and next(uploads) % 3 == 0 else _PASS

    with _flaky_proxy(s3_root.endpoint_url, cut_every_third_upload) as proxy:
        store = MaskStore(s3_root.root, endpoint_url=proxy.endpoint)
        store.add_images([ImageRecord("img0", "/nowhere/img0.png", 20, 16, "0" * 64)])
        assert _write_batches(store, 4, 60) == [1, 2, 3, 4]
        assert store.count_masks() == 240
        cut = [path for _, path, action in proxy.requests if action == _CUT]
        total = len(proxy.requests)
    # Both clients met resets and retried: pyarrow (data files) and boto3 (commits).
    cut_commits = sum("/_commits/" in p for p in cut)
    cut_data = sum("/masks/" in p for p in cut)
    assert len(cut) >= 5 and cut_commits >= 1 and cut_data >= 1
    incomplete = _check_bucket_is_whole(s3_root, 240)
    print(
        f"scenario 4 [reset mid-body]: {len(cut)} of {total} requests cut and retried "
        f"({cut_data} data-file, {cut_commits} commit uploads); 240 rows in 4 commits; "
        f"{incomplete} incomplete multipart uploads (invisible); "
        f"{time.perf_counter() - started:.1f} s"
    )


def test_s3_lost_commit_response_is_not_taken_for_a_conflict(s3_root: S3Root) -> None:
    """The commit PUT lands but its response is lost: the client's retry meets its own commit.

    The first batch loses every response to its commit PUT (the client gives up); the next
    ones lose the first. Neither may be mistaken for another writer's commit.
    """
    started = time.perf_counter()
    attempts: dict[str, int] = {}  # commit PUTs per commit key
    first = "/_commits/0000000001.json"

    def lose_commit_responses(method: str, path: str) -> str:
        if method != "PUT" or "/_commits/" not in path:
            return _PASS
        attempts[path] = attempts.get(path, 0) + 1
        return _LOSE_RESPONSE if path.endswith(first) or attempts[path] == 1 else _PASS

    with _flaky_proxy(s3_root.endpoint_url, lose_commit_responses) as proxy:
        store = MaskStore(s3_root.root, endpoint_url=proxy.endpoint)
        store.add_images([ImageRecord("img0", "/nowhere/img0.png", 20, 16, "0" * 64)])
        with pytest.raises(StorageError, match=r"_commits/0000000001\.json") as failed:
            _write_batches(store, 1, 40)
        # It did land: a rerun of the batch finds it committed and writes nothing.
        assert _write_batches(store, 1, 40) == [1]
        assert _write_batches(store, 5, 40)[1:] == [2, 3, 4, 5]
        lost, total = proxy.count(_LOSE_RESPONSE), len(proxy.requests)
    gave_up_after = next(n for path, n in attempts.items() if path.endswith(first))
    # Commit 1: every attempt lost. Commits 2-5: the first lost, the retry met its own object.
    assert sorted(attempts.values()) == [2, 2, 2, 2, gave_up_after] and gave_up_after >= 2
    assert lost == gave_up_after + 4
    assert _check_bucket_is_whole(s3_root, 200) == 0
    print(
        f"scenario 4 [lost responses]: {lost} of {total} responses lost; commit 1 gave up "
        f"after {gave_up_after} attempts with {type(failed.value).__name__} and its rerun wrote "
        f"nothing; commits 2-5 landed on their 2nd attempt; 200 rows in 5 commits; "
        f"{time.perf_counter() - started:.1f} s"
    )

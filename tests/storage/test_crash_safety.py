"""A writer process killed (SIGKILL) between its files leaves nothing visible; a rerun completes.

The child process is a real writer; it kills itself at the chosen point by wrapping one of the
store's own I/O calls, so the kill lands exactly between two files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.dataset as pads

from storage.mask_store import ImageRecord, MaskStore
from tests.fixtures.s3 import StoreRoot

N_MASKS = 40

_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from storage import rle
    from storage.mask_store import MaskRecord, MaskStore

    root, endpoint, mode = sys.argv[1], sys.argv[2] or None, sys.argv[3]
    store = MaskStore(root, endpoint_url=endpoint)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "before_commit":
        # The data file is written; the commit record that would make it visible is not.
        put = store.location.put_bytes
        def put_then_die_at_commit(key, data, *, exclusive=False):
            if key.startswith("_commits/"):
                die()
            put(key, data, exclusive=exclusive)
        store.location.put_bytes = put_then_die_at_commit
    elif mode == "before_rename":
        # The data file's bytes are on disk under a temporary name; the rename never happens.
        os.replace = lambda *args, **kwargs: die()

    rng = np.random.default_rng(123)
    masks = rng.random((N_MASKS, 16, 20)) < 0.3
    records = [MaskRecord("img0", r, 1, 0, "manual", "run-k") for r in rle.encode(masks)]
    info = store.write_masks(records, stage=1, round=0, run_id="run-k")
    print(info.counts["masks"])
    """
).replace("N_MASKS", str(N_MASKS))


def _run_writer(
    root: StoreRoot, mode: str, *, run_id: str = "run-k"
) -> subprocess.CompletedProcess[str]:
    script = _WRITER.replace('"run-k"', repr(run_id))
    return subprocess.run(
        [sys.executable, "-c", script, root.root, root.endpoint_url or "", mode],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        cwd=Path(__file__).resolve().parents[2],
    )


def _registered_store(root: StoreRoot) -> MaskStore:
    store = MaskStore(root.root, endpoint_url=root.endpoint_url)
    store.add_images([ImageRecord("img0", "/nowhere/img0.png", 20, 16, "0" * 64)])
    return store


def test_writer_killed_between_data_file_and_commit(store_root: StoreRoot) -> None:
    store = _registered_store(store_root)
    killed = _run_writer(store_root, "before_commit")
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # The data file exists but no commit names it: no reader sees any of its rows.
    orphans = store.location.list("masks")
    assert len(orphans) == 1
    reader = MaskStore(store_root.root, endpoint_url=store_root.endpoint_url)
    assert reader.commits() == [] and reader.count_masks() == 0
    assert list(reader.iter_image_masks()) == []

    rerun = _run_writer(store_root, "normal")
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == str(N_MASKS)
    ids = reader.masks()["mask_id"].to_pylist()
    assert len(ids) == len(set(ids)) == N_MASKS
    assert [c.sequence for c in reader.commits()] == [1]

    # gc removes exactly the orphan; the committed data is untouched.
    assert reader.gc() == orphans
    assert reader.count_masks() == N_MASKS
    if store_root.kind == "local":
        table = pads.dataset(f"{store_root.root}/masks", partitioning="hive").to_table()
        assert table.num_rows == N_MASKS

    # A third run of the same batch adds nothing.
    again = _run_writer(store_root, "normal")
    assert again.returncode == 0 and again.stdout.strip() == "0"
    assert MaskStore(store_root.root, endpoint_url=store_root.endpoint_url).count_masks() == N_MASKS


def test_writer_killed_before_its_local_rename(tmp_path: Path) -> None:
    root = StoreRoot(kind="local", root=str(tmp_path / "store"), endpoint_url=None)
    store = _registered_store(root)
    killed = _run_writer(root, "before_rename")
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # Only a hidden temporary file exists: invisible to the store and to pyarrow.dataset.
    assert store.location.list("masks") == []
    temps = store.location.list("masks", include_hidden=True)
    assert len(temps) == 1 and temps[0].rsplit("/", 1)[-1].startswith(".")
    assert pads.dataset(f"{root.root}/masks", partitioning="hive").to_table().num_rows == 0
    assert store.count_masks() == 0

    rerun = _run_writer(root, "normal")
    assert rerun.returncode == 0, rerun.stderr
    assert store.count_masks() == N_MASKS
    assert store.gc() == temps


def test_killed_writer_leaves_older_commits_readable(store_root: StoreRoot) -> None:
    store = _registered_store(store_root)
    assert _run_writer(store_root, "normal").returncode == 0
    before = store.masks().sort_by("mask_id")
    # The same masks under another run id are new masks; that writer dies before its commit.
    killed = _run_writer(store_root, "before_commit", run_id="run-2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after = MaskStore(store_root.root, endpoint_url=store_root.endpoint_url).masks()
    assert after.sort_by("mask_id").equals(before)
    assert len(store.location.list("masks")) == 2  # the committed file and the orphan

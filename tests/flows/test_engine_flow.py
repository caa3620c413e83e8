"""The parent flow on a tiny budget: killed in stage 2, resumed, nothing lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from flows.report.summary import read_round_manifests
from storage.mask_store import MaskStore
from tests.flows.conftest import tiny_engine_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

_RUN = (
    "import json, sys\n"
    "from flows.config import parse_config\n"
    "from flows.engine import data_engine\n"
    "data_engine(parse_config(json.load(open(sys.argv[1]))))\n"
)


def _engine_process(config_file: Path, prefect_home: Path, log: Path) -> subprocess.Popen[bytes]:
    """The parent flow in its own process (group), on the harness's API, with a fixed result
    store (PREFECT_HOME) so a second process finds the first one's cached task results."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return subprocess.Popen(
        [sys.executable, "-c", _RUN, str(config_file)],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group: the SIGKILL takes every child with it
    )


def _wait_for_stage2_commit(store_root: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"engine exited ({process.returncode}) before stage 2:\n{_tail(log)}")
        commits = store_root / "_commits"
        if commits.is_dir():
            for path in commits.glob("*.json"):
                if json.loads(path.read_text())["stage"] == 2:
                    return
        time.sleep(0.2)
    pytest.fail(f"no stage-2 commit within 600 s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def test_killed_in_stage2_then_resumed_keeps_every_mask_once(
    prefect_harness: None, tmp_path: Path, trained_tiny_checkpoint: str
) -> None:
    root = tmp_path / "root"
    config_file = tmp_path / "engine.json"
    # A model that segments, so stage 3 has real masks to store (and to store only once).
    data = tiny_engine_data(
        root, stage1={"rounds": 1}, model={"checkpoint": trained_tiny_checkpoint}
    )
    config_file.write_text(json.dumps(data))
    prefect_home = tmp_path / "prefect-home"
    log = tmp_path / "engine.log"

    first = _engine_process(config_file, prefect_home, log)
    try:
        _wait_for_stage2_commit(root, first, log)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    store = MaskStore(str(root))
    before = {c.sequence: c for c in store.commits()}
    assert not [c for c in before.values() if c.stage == 3], "killed too late: stage 3 ran"
    versions_before = len(list((root / "models").glob("v*/card.json")))

    second = _engine_process(config_file, prefect_home, log)
    assert second.wait(timeout=900) == 0, _tail(log)

    store = MaskStore(str(root))
    commits = store.commits()
    # What was committed before the kill stays as it was; the resumed run re-commits nothing.
    for c in commits:
        if c.sequence in before:
            assert c == before[c.sequence]
    with_masks = Counter((c.stage, c.round) for c in commits if c.files and c.run_id == "engine")
    assert all(n == 1 for n in with_masks.values()), with_masks

    # Every mask exactly once: unique ids, and no round holds the same pixels twice on an image.
    table = store.masks(split="pool")
    ids = table["mask_id"].to_pylist()
    assert len(ids) == len(set(ids))
    keys = list(
        zip(
            table["stage"].to_pylist(),
            table["round"].to_pylist(),
            table["image_id"].to_pylist(),
            table["counts"].to_pylist(),
            strict=True,
        )
    )
    assert len(keys) == len(set(keys))

    # The stages completed: a manifest per round whose mask count is what the store holds.
    manifests = read_round_manifests(store)
    assert set(manifests) == {(1, 0), (2, 0), (2, 1), (3, 0)}
    for (stage, round_), manifest in manifests.items():
        assert store.count_masks(stage=stage, round=round_, split="pool") == manifest["masks"]
    assert store.count_masks(stage=3) > 0

    # One version per (stage, round): the resumed run reused what was registered before the kill.
    cards = [json.loads(p.read_text()) for p in sorted((root / "models").glob("v*/card.json"))]
    made_for = Counter(
        (c["extra"].get("role"), c["extra"].get("stage"), c["extra"].get("round")) for c in cards
    )
    assert all(n == 1 for n in made_for.values()), made_for
    assert len(cards) == 1 + len(manifests) >= versions_before

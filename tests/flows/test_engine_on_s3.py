"""The whole engine against the moto S3 server: images, ground truth, the mask store, the model
registry and every checkpoint on S3; nothing of the run lands on local disk."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import boto3
import pytest

from engine.synthetic import write_synthetic_dataset
from flows.config import parse_config
from flows.engine import data_engine
from storage.mask_store import MaskStore
from tests.fixtures.s3 import S3Root
from tests.flows.conftest import tiny_engine_data


def _upload(folder: Path, s3: S3Root, prefix: str) -> str:
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1")
    for path in sorted(folder.iterdir()):
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"s3://{s3.bucket}/{prefix}"


@pytest.mark.s3
@pytest.mark.slow
def test_the_whole_engine_runs_on_s3(
    prefect_harness: None, s3_root: S3Root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_synthetic_dataset(tmp_path / "pool", 6, seed=11, size=(96, 96))
    write_synthetic_dataset(tmp_path / "holdout", 2, seed=12, size=(96, 96))
    pool = _upload(tmp_path / "pool", s3_root, "incoming/pool")
    holdout = _upload(tmp_path / "holdout", s3_root, "incoming/holdout")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # anything written relative to the working directory shows up here

    data = tiny_engine_data(
        s3_root.root,
        source={
            "images": pool,
            "holdout": holdout,
            "holdout_coco": f"{holdout}/annotations.json",
            "pool_coco": f"{pool}/annotations.json",
        },
        stage1={"rounds": 1, "images_per_round": 2},
        stage2={"rounds": 1, "images_per_round": 2},
        # A one-step model answers points with near-whole-image masks: keep them.
        stage3={"rounds": 1, "images_per_round": 2, "max_mask_region_fraction": None},
    )
    config = parse_config({**data, "endpoint_url": s3_root.endpoint_url})
    report = data_engine(config)

    store = MaskStore(s3_root.root, endpoint_url=s3_root.endpoint_url)
    images = store.images()
    assert Counter(r.split for r in images) == {"pool": 6, "holdout": 2}
    assert all(r.uri.startswith(f"s3://{s3_root.bucket}/incoming/") for r in images)
    per_stage = Counter(r.stage for r in store.mask_records(split="pool"))
    assert set(per_stage) == {1, 2, 3} and all(n > 0 for n in per_stage.values())
    assert [s.masks for s in report.stages] == [per_stage[1], per_stage[2], per_stage[3]]
    # Every model version (base + one retrain per round) is a checkpoint in the bucket.
    checkpoints = [k for k in store.location.list("models") if k.endswith("/checkpoint.pt")]
    assert len(checkpoints) == 4, checkpoints
    assert f"models/{report.final_version}/checkpoint.pt" in checkpoints
    assert os.listdir(work) == []

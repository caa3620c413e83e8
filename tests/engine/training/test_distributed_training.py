"""Data-parallel training: two real processes in a Gloo group (as ``torchrun`` would start them)
train the same model; their gradients are averaged, so they end with the same weights, which
differ from what one process alone learns; rank 0 alone writes the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.builder import build_sam
from engine.training import SyntheticTrainingData, TrainConfig, train
from engine.training.distributed import average_gradients, rank_and_world

_CONFIG = TrainConfig(
    steps=3,
    warmup_steps=1,
    images_per_step=1,
    masks_per_image=2,
    num_rounds=2,
    no_point_rounds=0,
    focal_weight=0,
)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_sam("tiny", image_size=64)


def _flat(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        assert rank_and_world() == (rank, world)
        # Gradients: rank r holds r + 1; `b` has none on rank 1 (counts as zero).
        a = torch.nn.Parameter(torch.zeros(3))
        b = torch.nn.Parameter(torch.zeros(2))
        a.grad = torch.full((3,), float(rank + 1))
        b.grad = None if rank == 1 else torch.full((2,), 4.0)
        average_gradients([a, b])
        assert a.grad is not None and b.grad is not None

        # Each rank starts from different weights: rank 0's must win.
        model = _model(seed=rank)
        data = SyntheticTrainingData(model.img_size, scene_size=(64, 64))
        result = train(model, data, _CONFIG, checkpoint_uri=f"{out}/ckpt-{rank}.pt", progress=False)
        np.save(f"{out}/params-{rank}.npy", _flat(model))
        report = {
            "a": a.grad.tolist(),
            "b": b.grad.tolist(),
            "losses": [log.loss for log in result.history],
            "masks": [log.masks for log in result.history],
            "steps": result.step,
        }
        Path(f"{out}/report-{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_average_gradients_and_keep_the_same_weights(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True)
    reports = [json.loads((out / f"report-{r}.json").read_text()) for r in (0, 1)]
    params = [np.load(out / f"params-{r}.npy") for r in (0, 1)]

    assert reports[0]["a"] == reports[1]["a"] == [1.5, 1.5, 1.5]
    assert reports[0]["b"] == reports[1]["b"] == [2.0, 2.0]
    assert reports[0]["steps"] == reports[1]["steps"] == 3
    assert reports[0]["losses"] == reports[1]["losses"]  # the mean over ranks, on each
    assert reports[0]["masks"] == [4, 4, 4]  # 2 masks per rank per step
    np.testing.assert_array_equal(params[0], params[1])
    assert (out / "ckpt-0.pt").exists() and not (out / "ckpt-1.pt").exists()

    # Rank 0 alone, as one process: same start, same samples, but no rank 1 gradients.
    start = _flat(_model(seed=0))
    alone = _model(seed=0)
    train(alone, SyntheticTrainingData(64, scene_size=(64, 64)), _CONFIG, progress=False)
    assert not np.array_equal(params[0], start)
    assert not np.allclose(params[0], _flat(alone), atol=1e-7)

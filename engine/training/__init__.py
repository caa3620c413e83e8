"""Retraining on accumulated masks with SAM's interactive recipe.

data = StoreTrainingData(store, model.img_size)        # or SyntheticTrainingData(img_size)
result = train(model, data, TrainConfig(steps=2000))   # model trained in place
"""

from engine.training.data import (
    AugmentConfig,
    ReplayTrainingData,
    StoreTrainingData,
    SyntheticTrainingData,
    TrainingData,
    TrainSample,
)
from engine.training.loop import (
    StepLog,
    TrainConfig,
    TrainResult,
    lr_at,
    no_point_rounds_for,
    train,
)
from engine.training.simulation import SimulationResult, simulate_interactive

__all__ = [
    "AugmentConfig",
    "ReplayTrainingData",
    "SimulationResult",
    "StepLog",
    "StoreTrainingData",
    "SyntheticTrainingData",
    "TrainConfig",
    "TrainResult",
    "TrainSample",
    "TrainingData",
    "lr_at",
    "no_point_rounds_for",
    "simulate_interactive",
    "train",
]

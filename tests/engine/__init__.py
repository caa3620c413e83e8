"""Tests of the engine package (model, predictor, checkpoints, training, AMG)."""

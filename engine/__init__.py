"""The model side of the engine: SAM modeling, predictor, training, evaluation, automatic masks."""

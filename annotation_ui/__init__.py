"""Label Studio side of the engine: labeling configs, the API client, the ML backend."""

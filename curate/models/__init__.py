"""Model wrappers: they load weights and turn batches into embeddings and scores, and know nothing of shards
or configs. Weights resolve through :mod:`curate.models.weights`."""

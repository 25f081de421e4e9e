"""The bundled diffusion trainer, installed as ``curate.train``. It consumes the WebDataset shards that a
curate run writes; its modules arrive with the trainer."""

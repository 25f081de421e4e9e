"""The offline sample world: generated images with ground truth, served from a local HTTP server."""

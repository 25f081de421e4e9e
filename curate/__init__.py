"""curate: curate image-text corpora for training generative models, and prove them by training on them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("curate")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

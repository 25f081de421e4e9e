"""Train the demo CLIP with its defaults and write it where the package ships it (curate/demo/demo_clip/).

Run after a change to the demo CLIP's training or to the world it draws; `curate demo` then uses the result on
first run instead of training (curate/demo/tiny_clip.py says how it is packed and checked). Training is
deterministic for a seed, so the files change only when the model does.

    .venv/bin/python scripts/pack_demo_clip.py [--trained FOLDER]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from curate.demo.tiny_clip import pack, shipped_folder, train_tiny_clip, unpack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--trained", type=Path, help="a folder train_tiny_clip wrote with its defaults; default: train"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trained = args.trained or Path(tmp) / "trained"
        if args.trained is None:
            train_tiny_clip(trained)
        info = pack(trained, shipped_folder())
        unpack(Path(tmp) / "check")  # raises if the package does not rebuild the trained model
    size = sum(f.stat().st_size for f in shipped_folder().iterdir())
    print(f"packed into {shipped_folder()}: {size / 1e6:.2f} MB, {info['moved_token_rows']} token rows moved")


if __name__ == "__main__":
    main()

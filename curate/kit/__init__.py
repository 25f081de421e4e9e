"""What stages share: HTTP fetching, image decoding and hashing, batches of images for models, LAION heads,
the base of hub-model stages, filter rules, caption text, hash lists and duplicate finding. Knows no run."""

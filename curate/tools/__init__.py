"""Tools that work on a finished run: the report, threshold preview, retry and takedown."""

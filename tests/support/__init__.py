"""Test support: generated inputs, tiny models, test-only stages and a hostile HTTP server. Not installed."""

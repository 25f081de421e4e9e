"""The pipelines shipped with curate, installed as ``curate.pipelines`` (package data)."""

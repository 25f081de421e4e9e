"""curate's stages, one module each; installed as ``curate.stages``. Names in YAML map to classes in
``curate.core.registry``."""

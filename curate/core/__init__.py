"""The framework: the pipeline YAML, the columns, the stage contract, reading input, running phases, writing
shards, and the output layout. Nothing here knows a particular stage."""

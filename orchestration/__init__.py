"""The `amused` command and the run graph: the run config (one YAML, checked before any
work), the stages in order (each a thin call into `pipeline/` or `training/`), resume by
stage fingerprints, status. Nothing imports this package."""

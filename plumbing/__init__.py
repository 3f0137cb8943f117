"""Shared plumbing every layer uses and that knows nothing of models or data: typed-config
helpers (`config`), fsspec storage and atomic writes (`storage`, `fsio`), the Ray session,
run-folder locks, device and dtype resolution, plots. It imports no other package of ours."""

"""Benchmarks and checks of the fast paths, run as modules from the repository root (`python -m benchmarks.NAME`):
`realtime` (the real-time path on one GPU), `extract` (decoding and CLIP extraction), `train` (training
throughput) and `check_fast_session` (the fast realtime session answers exactly as the stock one).
Their shared timing and model-building helpers are in `common`."""

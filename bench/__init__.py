"""Benchmarks: asyncinfer against the model's own limit, the bare HTTP server and BentoML.

`python -m bench.run --quick|--full` regenerates docs/benchmarks.md and docs/img/bench-*.png.
"""

"""Benchmarks: asyncinfer against the model's own limit and BentoML, at equal CPU.

`python -m bench.run --quick|--full` regenerates docs/benchmarks.md, docs/img/bench-*.png and
the raw JSON under docs/bench-data/. The load generator is asyncinfer.loadgen.
"""

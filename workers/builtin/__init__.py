"""Built-in models: a synthetic a·n+b model for tests and benchmarks, and a real torch MLP."""

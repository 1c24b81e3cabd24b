"""Benchmarks of the served agent: `python -m bench` (see bench/__main__.py) and
`python -m bench.load` (k6 against a freshly started stack)."""

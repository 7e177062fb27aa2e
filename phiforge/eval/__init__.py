"""`phiforge eval`: benchmarks scored as lm-evaluation-harness scores them (harness.py; see docs/eval.md)."""

"""Evaluation: greedy generation, the refusal judge, task accuracy, safety-token drift against a cache, and the
report comparing runs."""

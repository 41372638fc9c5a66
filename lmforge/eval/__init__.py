"""Evaluation: tasks that execute, an lm-evaluation-harness bridge, a contamination audit and a provenance check."""

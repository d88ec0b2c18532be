"""Evaluation: metric maths (metrics.py), records and their JSONL form (records.py), benchmark scoring
(score.py, benchmarks.py), running a model over shards (runner.py), overlays, and the `eval` verb (verb.py).
"""

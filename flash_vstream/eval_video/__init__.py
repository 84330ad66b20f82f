"""Benchmark evaluation: inference over test_qa.json, then scoring and aggregation.

inference.py  the one inference driver: test_qa.json -> JSONL answers (sharded, resumable)
run_eval.py   launcher: one inference process per GPU, merge, then score
judge.py      Video-ChatGPT yes/no + 0-5 judging through any OpenAI-compatible server
metrics.py    no-judge metrics: normalised exact match, multiple choice by log-likelihood
aggregate.py  prediction files in, results.json / results.csv / tables out (shared)
"""

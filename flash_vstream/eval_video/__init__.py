"""Benchmark evaluation: inference over test_qa.json, then scoring and aggregation.

judge.py      Video-ChatGPT yes/no + 0-5 judging through any OpenAI-compatible server
metrics.py    no-judge metrics: normalised exact match, multiple choice by log-likelihood
aggregate.py  prediction files in, results.json / results.csv / tables out (shared)
"""

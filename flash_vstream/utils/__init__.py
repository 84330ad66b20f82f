"""Helpers shared by the entry points: files (atomic writes, JSONL, resumable result files),
sharding, and summary statistics."""

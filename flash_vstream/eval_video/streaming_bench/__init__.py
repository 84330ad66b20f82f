"""Streaming benchmarks answered from the live memory (StreamingBench, OVO-Bench, VStream-QA real-time,
multiple-choice sets): `loaders` reads the official annotation files, `protocol` plays each video once
through `StreamSession` and asks every question at its time, `scoring` applies each benchmark's own rules.
The command line is `python -m flash_vstream.eval_video.streaming`."""

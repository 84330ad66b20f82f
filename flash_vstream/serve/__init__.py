"""Real-time serving: ask questions about a video stream while it plays (`scripts/realtime_cli.sh`).

session.py           StreamSession: the synchronous core (frames -> STAR memory -> snapshots -> answers)
sources.py           frame sources: video file, camera, network stream URL, synthetic noise
cli_video_stream.py  the process shell (source, frame handler, question handler) and the CLI
memory_plot.py       a PNG timeline of which frames each memory holds at each question
"""

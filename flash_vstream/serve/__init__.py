"""Real-time serving: ask questions about a video stream while it plays (`scripts/realtime_cli.sh`).

session.py           StreamSession: the synchronous core (frames -> STAR memory -> snapshots -> answers);
                     QuestionSchedule: the one rule for when a scripted question is due
engine.py            Engine: the process shell of the CLI and the server (sessions as state, source threads,
                     an ingest lane and an answer lane, round robin; failures per session or stop-all)
telemetry.py         latency stats, the JSON Lines event log, process RSS, the printed summary
cli_video_stream.py  the command line: arguments, presentation, the scripted and interactive front ends
sources.py           frame sources: video file, camera, network stream URL, synthetic noise
memory_plot.py       a PNG timeline of which frames each memory holds at each question
server.py, api/      the streaming server (HTTP / WebSocket sessions on one model)
"""

"""The realtime engine's telemetry: latency summaries, the event log, the printed summary."""

import json
import threading

from flash_vstream.serve.telemetry import STATS, EventLog, LatencyStats, format_summary, role_stats, rss_bytes
from flash_vstream.utils.stats import percentile


def test_latency_stats():
    stats = LatencyStats(capacity=100)
    for i in range(1, 1001):
        stats.add(i / 1000)
    summary = stats.summary()
    assert summary["count"] == 1000 and summary["max"] == 1.0 and abs(summary["mean"] - 0.5005) < 1e-9
    assert 0.3 < summary["p50"] < 0.7 and len(stats._samples) == 100
    assert LatencyStats().summary()["p50"] is None


def test_latency_percentiles_follow_the_one_rule_and_adds_from_threads_all_count():
    stats = LatencyStats()
    samples = [0.5, 0.1, 0.4, 0.2, 0.3]
    for s in samples:
        stats.add(s)
    stats.add(None)  # "no first token": not a sample
    summary = stats.summary()
    assert summary["count"] == 5
    assert summary["p50"] == percentile(samples, 50) == 0.3
    assert summary["p99"] == percentile(samples, 99)

    shared = LatencyStats(capacity=50)
    threads = [threading.Thread(target=lambda: [shared.add(0.001) for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shared.summary()["count"] == 8000 and len(shared._samples) == 50


def test_event_log_and_summary_table(tmp_path):
    path = tmp_path / "log.jsonl"
    log = EventLog(str(path))
    log.write("start", mode="scripted")
    log.write("progress", frames=3, rss_bytes=rss_bytes())
    log.close()
    log.write("late")  # after close: dropped, not an error
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "progress"]
    assert events[1]["frames"] == 3 and events[1]["rss_bytes"] > 0 and events[0]["elapsed_s"] >= 0
    EventLog().write("nowhere")  # no path: a no-op

    stats = role_stats()
    assert set(stats) == set(STATS)
    stats["encode_memory_update"].add(0.25)
    table = format_summary({"latency_s": {k: s.summary() for k, s in stats.items()},
                            "frames": {"ingested": 1, "dropped": 0, "stream_time": 0.0}, "answered": 0})
    lines = table.splitlines()
    assert lines[0].split() == ["latency", "(s)", "count", "mean", "p50", "p99", "max"]
    assert "encode + memory update" in table and "0.2500" in table
    assert lines[-1].startswith("frames: 1 ingested, 0 dropped") and "stream time 0.0s" in lines[-1]

"""What the realtime engine measures and records: latency summaries, the JSON Lines event log, the
process's resident memory, and the printed summary.

Nothing here decides anything: the engine and the CLI feed these objects and read them back.
"""

import datetime
import json
import os
import random
import sys
import threading
import time

from ..utils.stats import percentile

# key in the log -> label in the printed summary; the roles' latencies, in seconds
STATS = {
    "frame_decode": "frame decode (source)",
    "encode_memory_update": "encode + memory update",
    "time_to_first_token": "time to first token",
    "answer_time": "answer time",
    "question_latency": "question latency (due -> answered)",
}


class LatencyStats:
    """count / mean / max exactly; p50 / p99 over all samples up to `capacity`, then over a uniform
    reservoir sample, so a stream of any length keeps this bounded. Thread-safe `add`: the sources of
    several sessions may add to one."""

    def __init__(self, capacity=8192, seed=0):
        self.capacity = capacity
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        """Forget every sample (a benchmark's warm-up)."""
        with self._lock:
            self.count, self.total, self.max, self.last = 0, 0.0, 0.0, None
            self._samples = []

    def add(self, seconds):
        if seconds is None:
            return
        with self._lock:
            self.count += 1
            self.total += seconds
            self.max = max(self.max, seconds)
            self.last = seconds
            if len(self._samples) < self.capacity:
                self._samples.append(seconds)
            else:
                slot = self._rng.randrange(self.count)
                if slot < self.capacity:
                    self._samples[slot] = seconds

    def samples(self):
        """The samples kept (all of them up to `capacity`, then the reservoir), in no particular order."""
        with self._lock:
            return list(self._samples)

    def summary(self):
        with self._lock:
            if not self.count:
                return {"count": 0, "mean": None, "p50": None, "p99": None, "max": None}
            samples = list(self._samples)
            return {"count": self.count, "mean": self.total / self.count, "p50": percentile(samples, 50),
                    "p99": percentile(samples, 99), "max": self.max}


def role_stats():
    """One `LatencyStats` per measured role (the keys of STATS)."""
    return {key: LatencyStats() for key in STATS}


class EventLog:
    """JSON Lines event log (`--log-file`); writes from any thread, one flushed line per event.

    Flushed, not fsynced: the frame handler writes progress lines, and a disk sync there would show
    up in the ingest latencies it records. A path of None makes every write a no-op."""

    def __init__(self, path=None):
        self._file = open(path, "w", encoding="utf-8") if path else None
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def write(self, event, **fields):
        if self._file is None:
            return
        line = {"event": event, "wall": datetime.datetime.now().isoformat(timespec="milliseconds"),
                "elapsed_s": round(time.perf_counter() - self._t0, 6), **fields}
        text = json.dumps(line, default=str)
        with self._lock:
            if self._file is not None:
                self._file.write(text + "\n")
                self._file.flush()

    def close(self):
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def rss_bytes():
    """Resident set size of this process now (Linux); peak RSS elsewhere; None if unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def format_summary(summary):
    """The end-of-run table printed to stderr: `summary` holds `latency_s` {key: LatencyStats.summary()},
    `frames` {ingested, dropped, stream_time} and `answered`."""
    lines = [f"{'latency (s)':<36}{'count':>7}{'mean':>10}{'p50':>10}{'p99':>10}{'max':>10}"]
    for key, label in STATS.items():
        s = summary["latency_s"][key]
        if s["count"]:
            lines.append(f"{label:<36}{s['count']:>7}{s['mean']:>10.4f}{s['p50']:>10.4f}{s['p99']:>10.4f}"
                         f"{s['max']:>10.4f}")
        else:
            lines.append(f"{label:<36}{0:>7}{'-':>10}{'-':>10}{'-':>10}{'-':>10}")
    f = summary["frames"]
    stream_time = "-" if f["stream_time"] is None else f"{f['stream_time']:.1f}s"
    lines.append(f"frames: {f['ingested']} ingested, {f['dropped']} dropped (live source lagging), "
                 f"stream time {stream_time}; questions answered: {summary.get('answered', 0)}")
    return "\n".join(lines)

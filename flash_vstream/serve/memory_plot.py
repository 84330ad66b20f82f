"""A picture of the STAR memory: which frames each memory holds at each question, on a stream-time axis.

One horizontal band per question (first question on top), three lanes per band:
  temporal   a circle at each centroid's (weighted mean) time, area proportional to its weight
             (frames it stands for, written beside it), and a bar over the span of those frames;
  retrieved  a diamond at each retrieved frame;
  spatial    a square at the newest frame(s).
A dashed vertical line marks the question's time; the stream after it is shaded (not yet seen).
The abstract memory is a set of learned summaries with no frame of its own, so it has no lane.

Records are plain dicts, so the realtime CLI (`--memory-plot`) and the demo draw the same picture:
`{"time", "question", "timestamps": {"temporal", "retrieved", "spatial"}, "weights", "spans"}`
(`MemorySnapshot.plot_record` or `memory_record` build them). Drawn with the Agg canvas directly:
no pyplot, no global backend switch.
"""

import os

LANES = (("temporal", 0.52, "tab:blue"), ("retrieved", 0.32, "tab:orange"), ("spatial", 0.14, "tab:green"))
TEMPORAL_ROWS, TEMPORAL_ROW_STEP = 4, 0.105  # centroids alternate over 4 sub-rows so that spans stay apart
MARKERS = {"temporal": "o", "retrieved": "D", "spatial": "s"}


def memory_record(memory, time, question):
    """A plot record from a live `STARMemory` (what the demo holds)."""
    return {"time": float(time), "question": question, "frames_seen": memory.frames_seen,
            "timestamps": memory.timestamps(), "weights": memory.temporal_weights(),
            "spans": [list(s) for s in memory.temporal_spans()]}


def _shorten(text, width=48):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def plot_memory_timeline(records, path, title=None, stream_end=None):
    """Draw `records` (one per question, in any order) to the PNG `path`; returns `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    records = sorted(records, key=lambda r: float(r["time"]))
    if not records:
        raise ValueError("no questions to draw: the memory plot needs at least one record")
    seen = []
    for r in records:
        ts = r.get("timestamps") or {}
        seen += [float(x) for key in ("temporal", "retrieved", "spatial") for x in ts.get(key, [])]
        seen += [float(x) for span in r.get("spans") or [] for x in span]
    end = float(stream_end) if stream_end is not None else max(seen + [float(r["time"]) for r in records])

    def asked_at(r):  # a question timed after the end of the stream was asked at the end
        return min(float(r["time"]), end)

    x_max = max(seen + [asked_at(r) for r in records] + [end, 1.0])
    pad = 0.02 * x_max
    w_max = max([w for r in records for w in r.get("weights") or []] + [1])
    area_per_frame = min(160.0 / w_max, 30.0)  # marker area proportional to weight, the largest <= ~170 pt^2

    n = len(records)
    fig = Figure(figsize=(12, 1.5 + 1.4 * n), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, rec in enumerate(records):
        base = n - 1 - i  # first question on top
        t_q = asked_at(rec)
        ts = rec.get("timestamps") or {}
        ax.axvspan(t_q, x_max + pad, ymin=base / n, ymax=(base + 1) / n, color="0.93", zorder=0)
        ax.plot([t_q, t_q], [base + 0.04, base + 0.96], linestyle="--", color="tab:red", linewidth=1.2, zorder=1)
        if i:
            ax.axhline(base + 1, color="0.6", linewidth=0.6)
        temporal = [float(x) for x in ts.get("temporal", [])]
        weights = list(rec.get("weights") or [1] * len(temporal))
        spans = rec.get("spans") or [(t, t) for t in temporal]
        for j, (t, w, (first, last)) in enumerate(zip(temporal, weights, spans)):
            y = base + LANES[0][1] + TEMPORAL_ROW_STEP * (j % TEMPORAL_ROWS)
            ax.plot([float(first), float(last)], [y, y], color=LANES[0][2], linewidth=2.5, alpha=0.45,
                    solid_capstyle="butt", zorder=2)
            size = 12 + area_per_frame * float(w)  # pt^2
            ax.scatter([t], [y], s=size, color=LANES[0][2], alpha=0.75, edgecolors="white", linewidths=0.5,
                       zorder=3)
            ax.annotate(str(int(w)), (t, y), xytext=(size**0.5 / 2 + 1, 0), textcoords="offset points",
                        ha="left", va="center", fontsize=6, color="0.25")
        for name, offset, colour in LANES[1:]:
            xs = [float(x) for x in ts.get(name, [])]
            ax.scatter(xs, [base + offset] * len(xs), marker=MARKERS[name], s=36, color=colour, zorder=3)
    ax.set_xlim(-pad, x_max + pad)
    ax.set_ylim(0, n)
    ax.set_yticks([n - 1 - i + 0.5 for i in range(n)])

    def label(i, r):
        when = f"@ {float(r['time']):.1f}s" if float(r["time"]) <= end else f"@ end (asked for {float(r['time']):.1f}s)"
        frames = f", {r['frames_seen']} frames" if r.get("frames_seen") is not None else ""
        return f"Q{i + 1} {when}{frames}\n{_shorten(r['question'])}"

    ax.set_yticklabels([label(i, r) for i, r in enumerate(records)], fontsize=7)
    ax.set_xlabel("stream time (s)")
    legend = [
        Line2D([], [], color=LANES[0][2], marker="o", linewidth=2.5, alpha=0.7,
               label="temporal centroid (area = frames it stands for; bar = their span)"),
        Line2D([], [], color=LANES[1][2], marker="D", linestyle="", label="retrieved frame"),
        Line2D([], [], color=LANES[2][2], marker="s", linestyle="", label="spatial frame"),
        Line2D([], [], color="tab:red", linestyle="--", label="question asked"),
    ]
    ax.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=7, frameon=False)
    fig.suptitle(title or "STAR memory at each question", fontsize=9)
    ax.text(1.0, -0.08 - 0.25 / n, "abstract memory not shown (no frame of its own)", transform=ax.transAxes,
            ha="right", va="top", fontsize=6, color="0.4")
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, format="png")
    return path

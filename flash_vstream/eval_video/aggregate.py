"""Prediction files in, results out: the scoring and tables the judge and the no-judge metrics share.

A prediction file is JSONL, one item per line: `{id, question, answer, answer_type, pred, ...}`,
or `{id, ..., error}` without `pred` when inference failed for that item. Items are keyed by id;
a repeated id is keyed `{id}_{k}` (k = 1, 2, ... for its second, third, ... occurrence), so keys
stay stable while a resumable inference run appends lines.

`report()` turns per-item verdicts into `results.json`, `results.csv` and a printed table.
The denominator is honest: every item is counted in `total` and lands in exactly one of
`judged` (has a verdict), `failed` (no verdict: the judge gave up or never got to it) and
`missing` (no prediction: inference recorded an error, or the item is absent from the
prediction file when a QA file is given). Accuracy and score are over judged items.
The published scorer counted accuracy by substring, truncated scores and dropped unjudged items
from the denominator; none of that happens here.

Across datasets (scripts/eval.sh):
    python -m flash_vstream.eval_video.aggregate --results-dirs D1 D2 ... [--names N1 N2 ...]
"""

import argparse
import csv
import io
import json
import os
import re
import sys

from flash_vstream.utils.files import read_jsonl, write_atomic, write_json

COUNTS = ("total", "judged", "failed", "missing", "yes", "no")
CSV_COLUMNS = ("level", "group", "accuracy", "score") + COUNTS
NEXT_TYPE = re.compile(r"^[CTD][A-Z]$")  # NExT-QA: CW CH TN TC TP DL DC DO ...


# ---------------------------------------------------------------- tables

def csv_text(header, rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


# ---------------------------------------------------------------- predictions

def assign_keys(records):
    """[(key, record)]: key = str(id); a repeated id gets `{id}_{k}` for its k-th repeat."""
    items, seen, counts = [], set(), {}
    for rec in records:
        if "id" not in rec:
            raise ValueError(f"record without 'id': {json.dumps(rec)[:200]}")
        base = str(rec["id"])
        key = base
        if key in seen:
            k = counts.get(base, 0)
            while key in seen:  # `{id}_{k}` may itself be a real id elsewhere in the file
                k += 1
                key = f"{base}_{k}"
            counts[base] = k
        seen.add(key)
        items.append((key, rec))
    return items


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def load_predictions(pred_file, qa_file=None, log=_stderr):
    """Keyed prediction items [(key, record)] from a JSONL prediction file.

    Unreadable lines (a truncated last line of a killed inference run) are skipped with a
    message. With `qa_file` (a test_qa.json list), QA items without a prediction are added as
    `{..., "error": "no prediction"}`, so they count as missing instead of vanishing.
    """
    records, bad = read_jsonl(pred_file)
    if bad:
        log(f"{pred_file}: skipped {len(bad)} unreadable line(s) {bad[:5]}")
    items = assign_keys(records)
    if qa_file:
        with open(qa_file, encoding="utf-8") as f:
            qa = json.load(f)
        have = {key for key, _ in items}
        for key, rec in assign_keys(qa):
            if key not in have:
                items.append((key, {**rec, "error": "no prediction"}))
    return items


def is_missing(record):
    """True for an item without a prediction (inference recorded an error, or none at all)."""
    return bool(record.get("error")) or not isinstance(record.get("pred"), str)


# ---------------------------------------------------------------- aggregation

def _new_group():
    return {**dict.fromkeys(COUNTS, 0), "_score_sum": 0, "_scored": 0}


def _finish(g):
    scored, score_sum = g.pop("_scored"), g.pop("_score_sum")
    return {
        "accuracy": g["yes"] / g["judged"] if g["judged"] else None,
        "score": score_sum / scored if scored else None,
        **g,
    }


def summarize(items, verdicts, judge_model, group_by_prefix=None, extra=None):
    """The results dict for keyed items and their verdicts.

    items: [(key, prediction record)]. verdicts: key -> {"verdict": "yes"|"no", "score": int
    0..5 or None (no-judge metrics have no score)}; items without one count as failed.
    group_by_prefix: also break types down by their first letter (NExT-QA's C/T/D);
    None = when every type looks like a NExT-QA type code.
    """
    overall, by_type, by_prefix = _new_group(), {}, {}
    histogram = {"yes": [0] * 6, "no": [0] * 6}
    failed_keys, missing_keys = [], []
    types = [str(rec.get("answer_type") or "unknown") for _, rec in items]
    if group_by_prefix is None:
        group_by_prefix = bool(types) and all(NEXT_TYPE.match(t) for t in types)
    for (key, rec), atype in zip(items, types):
        groups = [overall, by_type.setdefault(atype, _new_group())]
        if group_by_prefix:
            groups.append(by_prefix.setdefault(atype[0], _new_group()))
        v = verdicts.get(key)
        if is_missing(rec):
            outcome = "missing"
            missing_keys.append(key)
        elif v is None:
            outcome = "failed"
            failed_keys.append(key)
        else:
            outcome = "judged"
        for g in groups:
            g["total"] += 1
            g[outcome] += 1
            if outcome == "judged":
                g[v["verdict"]] += 1
                if v.get("score") is not None:
                    g["_score_sum"] += v["score"]
                    g["_scored"] += 1
        if outcome == "judged" and v.get("score") is not None:
            histogram[v["verdict"]][v["score"]] += 1
    result = {"judge_model": judge_model, **_finish(overall)}
    if any(histogram["yes"]) or any(histogram["no"]):
        result["score_histogram"] = histogram  # verdict x score (0..5) counts
    result["by_type"] = {t: _finish(g) for t, g in sorted(by_type.items())}
    if group_by_prefix:
        result["by_type_prefix"] = {p: _finish(g) for p, g in sorted(by_prefix.items())}
    result["failed_keys"] = failed_keys
    result["missing_keys"] = missing_keys
    result.update(extra or {})
    return result


def _rows(result):
    """(level, group, group dict) for the overall line, each type and each type prefix."""
    yield "all", "all", result
    for t, g in result["by_type"].items():
        yield "type", t, g
    for p, g in result.get("by_type_prefix", {}).items():
        yield "prefix", p, g


def _fmt(value, kind):
    if value is None:
        return "-"
    return {"accuracy": f"{100 * value:.2f}", "score": f"{value:.3f}"}.get(kind, str(value))


def format_grid(header, rows):
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells))
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_table(result):
    header = ("group", "acc(%)", "score") + COUNTS
    rows = []
    for level, name, g in _rows(result):
        label = name if level == "all" else f"  {level} {name}"
        rows.append((label, _fmt(g["accuracy"], "accuracy"), _fmt(g["score"], "score"),
                     *(g[c] for c in COUNTS)))
    title = f"judge: {result['judge_model']}"
    if result.get("pred_file"):
        title = f"{result['pred_file']} | {title}"
    return title + "\n" + format_grid(header, rows)


def write_results(result, output_dir):
    """DIR/results.json and DIR/results.csv (one row for all, each type, each type prefix)."""
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "results.json"), result)
    rows = [[level, name, *(("" if g[c] is None else g[c]) for c in CSV_COLUMNS[2:])]
            for level, name, g in _rows(result)]
    write_atomic(os.path.join(output_dir, "results.csv"), csv_text(CSV_COLUMNS, rows))


def report(items, verdicts, judge_model, output_dir, extra=None, out=None, group_by_prefix=None):
    """summarize + write_results + print the table (to `out`, default stdout); returns the results dict."""
    result = summarize(items, verdicts, judge_model, group_by_prefix=group_by_prefix, extra=extra)
    write_results(result, output_dir)
    print(format_table(result), file=out or sys.stdout, flush=True)
    return result


# ---------------------------------------------------------------- across datasets

def collect(results_dirs, names=None):
    """[(name, results dict or None)] for each results dir (None: no results.json there)."""
    names = names or list(results_dirs)
    if len(names) != len(results_dirs):
        raise ValueError(f"{len(names)} names for {len(results_dirs)} results dirs")
    rows = []
    for name, d in zip(names, results_dirs):
        path = os.path.join(d, "results.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                rows.append((name, json.load(f)))
        else:
            rows.append((name, None))
    return rows


def format_datasets(rows):
    header = ("dataset", "judge", "acc(%)", "score", "total", "judged", "failed", "missing")
    lines = []
    for name, r in rows:
        if r is None:
            lines.append((name, "(no results.json)", "-", "-", "-", "-", "-", "-"))
        else:
            lines.append((name, r["judge_model"], _fmt(r["accuracy"], "accuracy"), _fmt(r["score"], "score"),
                          r["total"], r["judged"], r["failed"], r["missing"]))
    return format_grid(header, lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Print one table of results.json files across datasets.")
    p.add_argument("--results-dirs", nargs="+", required=True, help="folders holding results.json")
    p.add_argument("--names", nargs="+", default=None, help="a dataset name per folder (default: the folder)")
    p.add_argument("--output", default=None, help="also write the table as .json or .csv")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.results_dirs):
        p.error(f"{len(args.names)} --names for {len(args.results_dirs)} --results-dirs")
    rows = collect(args.results_dirs, args.names)
    print(format_datasets(rows), flush=True)
    if args.output:
        keys = ("judge_model", "accuracy", "score", "total", "judged", "failed", "missing")
        table = [{"dataset": n, **({k: r.get(k) for k in keys} if r else dict.fromkeys(keys))} for n, r in rows]
        if args.output.endswith(".csv"):
            write_atomic(args.output, csv_text(("dataset",) + keys, [list(t.values()) for t in table]))
        else:
            write_json(args.output, table)
    absent = [n for n, r in rows if r is None]
    if absent:
        print(f"no results.json for: {', '.join(absent)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

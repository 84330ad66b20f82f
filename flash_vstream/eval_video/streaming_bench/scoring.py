"""Each benchmark's own scoring rules, applied to prediction lines joined to the annotation's queries.

Rules (read from the official scripts; the lenient and strict cases are theirs):
- `first_letter` (StreamingBench `count.py`): the first character of the reply equals the answer letter.
  Strict: "(B)", " B" or "b" are wrong. A question without a prediction is left out of its task's count
  (count.py skips it); it is reported as `missing`. Each task's accuracy and the total are over questions.
- `ovo_choice` (OVO-Bench backward and real-time tasks): the answer letter appears anywhere in the reply
  (`gt in response`). Lenient: "B. a dog" and "I think B" are right, and so is any reply containing the
  capital letter. No reply scores 0 and stays in the count.
- `ovo_count` (REC): the reply's digits, joined, equal the count: "3" and "3 times" are right; "2 or 3"
  ("23") and "three" are wrong.
- `ovo_yes_no` (SSR, CRR): the reply is exactly "Y" / "N" for yes / no, or contains "Yes" / "No"
  (case-sensitive: "yes" is wrong, "Not really" counts as "No").
  OVO-Bench: a task's score is the mean over its test points; a category the mean of its tasks; the total
  (`total`) the mean of the three categories. `total_task_mean` is the mean of the tasks, as OVO-Bench's
  score.py prints it.
- `exact` (VStream-QA without a judge): `metrics.exact_match` (normalised; a yes/no answer is decided by
  the reply's leading yes/no word). For the Video-ChatGPT judge `judge_input.jsonl` is written.
- `option` (generic multiple-choice files): the option the reply names (`metrics.option_index`: a
  leading letter such as "B", "(B)", "B." or the text of an option).

Questions with choices also get the `loglik` column: the option the model found most likely.
"""

import os
import re
import sys

from flash_vstream.eval_video.aggregate import csv_text, format_grid
from flash_vstream.utils.files import read_jsonl, write_atomic, write_json, write_jsonl

from .loaders import OVO_CATEGORIES


def _reply(rec):
    """The reply text of a prediction line, None without one (no line, or an error line)."""
    if rec is None or rec.get("error") or not isinstance(rec.get("answer"), str):
        return None
    return rec["answer"]


def first_letter(reply, query):
    return bool(reply) and reply[0] == query["gt"]


def ovo_choice(reply, query):
    return query["gt"] in reply


def ovo_count(reply, query):
    return "".join(re.findall(r"\d+", reply)) == str(query["gt"])


def ovo_yes_no(reply, query):
    if (reply == "N" and query["gt"] == 0) or (reply == "Y" and query["gt"] == 1):
        return True
    return ("Yes" if query["gt"] == 1 else "No") in reply


def exact(reply, query):
    from flash_vstream.eval_video.metrics import exact_match

    return exact_match(reply, query["gt"])


def option(reply, query):
    from flash_vstream.eval_video.metrics import option_index

    return option_index(reply.strip(), query["choices"]) == query["gt_index"]


RULES = {"first_letter": first_letter, "ovo_choice": ovo_choice, "ovo_count": ovo_count, "ovo_yes_no": ovo_yes_no,
         "exact": exact, "option": option}
# A missing reply: left out of the count (StreamingBench's count.py) or scored 0 (OVO-Bench's scorer); the
# project's own rules count it as wrong too, and every table says how many were missing.
MISSING_COUNTS = {"first_letter": False}


def load_prediction_files(paths, log=print):
    """key -> prediction line over several files (shards); a later answer line wins over an error line."""
    preds = {}
    for path in paths:
        records, bad = read_jsonl(path)
        if bad:
            log(f"{path}: skipped {len(bad)} unreadable line(s) {bad[:5]}")
        for rec in records:
            key = str(rec.get("key"))
            if key not in preds or _reply(preds[key]) is None:
                preds[key] = rec
    return preds


def _group():
    return {"correct": 0, "scored": 0, "total": 0, "missing": 0, "loglik_correct": 0, "loglik_scored": 0}


def _finish(g):
    g["accuracy"] = g["correct"] / g["scored"] if g["scored"] else None
    g["loglik_accuracy"] = g["loglik_correct"] / g["loglik_scored"] if g["loglik_scored"] else None
    return g


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def score(benchmark, queries, preds):
    """The results dict: per task, per category (OVO-Bench) and total, with each query's verdict."""
    tasks, total, verdicts, missing = {}, _group(), [], []
    for q in queries:
        rec = preds.get(q["key"])
        reply = _reply(rec)
        groups = [tasks.setdefault(q["task"], _group()), total]
        verdict = {"key": q["key"], "task": q["task"], "gt": q["gt"], "answer": reply}
        for g in groups:
            g["total"] += 1
        if reply is None:
            missing.append(q["key"])
            for g in groups:
                g["missing"] += 1
                if MISSING_COUNTS.get(q["rule"], True):
                    g["scored"] += 1
            verdict["correct"] = None
        else:
            hit = bool(RULES[q["rule"]](reply, q))
            verdict["correct"] = hit
            for g in groups:
                g["scored"] += 1
                g["correct"] += hit
        if q.get("choices") and rec is not None and isinstance(rec.get("loglik_index"), int):
            hit = rec["loglik_index"] == q["gt_index"]
            verdict["loglik_correct"] = hit
            for g in groups:
                g["loglik_scored"] += 1
                g["loglik_correct"] += hit
        verdicts.append(verdict)
    result = {"benchmark": benchmark, "tasks": {t: _finish(g) for t, g in tasks.items()}}
    if benchmark == "ovobench":
        categories = {}
        for name, names in OVO_CATEGORIES.items():
            present = [t for t in names if t in result["tasks"]]
            if present:
                categories[name] = {
                    "accuracy": _mean([result["tasks"][t]["accuracy"] for t in present]),
                    "loglik_accuracy": _mean([result["tasks"][t]["loglik_accuracy"] for t in present]),
                    "tasks": present}
        result["categories"] = categories
        result["total"] = {
            "accuracy": _mean([c["accuracy"] for c in categories.values()]),
            "loglik_accuracy": _mean([c["loglik_accuracy"] for c in categories.values()]),
            "total_task_mean": _mean([g["accuracy"] for g in result["tasks"].values()]),
            **{k: total[k] for k in ("correct", "scored", "total", "missing")}}
    else:
        result["total"] = _finish(total)
    result["missing_keys"] = missing
    return result, verdicts


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def table_rows(result):
    """(level, name, accuracy, loglik accuracy, correct, scored, total, missing) rows."""
    rows = []
    for name, g in result["tasks"].items():
        rows.append(("task", name, g["accuracy"], g["loglik_accuracy"], g["correct"], g["scored"], g["total"],
                     g["missing"]))
    for name, c in result.get("categories", {}).items():
        rows.append(("category", name, c["accuracy"], c["loglik_accuracy"], "", "", "", ""))
    t = result["total"]
    rows.append(("total", "total", t["accuracy"], t.get("loglik_accuracy"), t["correct"], t["scored"], t["total"],
                 t["missing"]))
    if "total_task_mean" in t:
        rows.append(("total", "mean of tasks", t["total_task_mean"], None, "", "", "", ""))
    return rows


def write_report(result, verdicts, queries, preds, output_dir, out=None):
    """OUT/results.json, results.csv, verdicts.jsonl (and judge_input.jsonl for open answers); prints the table."""
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "results.json"), result)
    rows = table_rows(result)
    header = ("level", "name", "accuracy", "loglik_accuracy", "correct", "scored", "total", "missing")
    write_atomic(os.path.join(output_dir, "results.csv"),
                 csv_text(header, [[("" if v is None else v) for v in r] for r in rows]))
    write_jsonl(os.path.join(output_dir, "verdicts.jsonl"), verdicts)
    if any(q["rule"] == "exact" for q in queries):
        # the Video-ChatGPT judge's input: {id, question, answer (reference), answer_type, pred}
        lines = []
        for q in queries:
            rec = preds.get(q["key"])
            line = {"id": q["key"], "question": q["question"], "answer": q["gt"], "answer_type": q["task"]}
            reply = _reply(rec)
            lines.append({**line, "pred": reply} if reply is not None else {**line, "error": "no prediction"})
        write_jsonl(os.path.join(output_dir, "judge_input.jsonl"), lines)
    title = f"{result['benchmark']} | protocol {result.get('protocol')} | model {result.get('model')}"
    grid = format_grid(("", "acc(%)", "loglik(%)", "correct", "scored", "total", "missing"),
                       [(n if lv == "total" else f"  {lv} {n}", _pct(a), _pct(b), c, s, t, m)
                        for lv, n, a, b, c, s, t, m in rows])
    print(title + "\n" + grid, file=out or sys.stdout, flush=True)

"""The official annotation files, field for field, as a flat list of queries: one question asked at one time.

    load_annotations(benchmark, path) -> (queries, problems)

A query is a dict:
    key       unique within the file, stable across runs (the prediction files are keyed by it)
    video     the video as the annotation names it (StreamingBench `video_path`, OVO-Bench `video`,
              VStream-QA `video` or `video_id`)
    question  the annotation's question text (OVO-Bench forward tasks: the question this project asks)
    time      seconds into the video at which it is asked; None: at the end of the video
    prompt    the text sent to the model after `<image>`
    choices   option texts for the log-likelihood column (multiple choice; Yes/No), else None
    gt        what the benchmark's scorer compares with: a letter, a count, 0/1 (No/Yes) or an answer text
    gt_index  index of the right choice in `choices` (None without choices)
    rule      the scoring rule (scoring.RULES)
    task      the benchmark's task name; category: its group (OVO-Bench), else None
    ids       the benchmark's own identifiers, copied into every prediction line

Formats (read from the official repositories):
- StreamingBench `questions_real.json`: [{video_path, video_categories, time, questions: [{task_type,
  question, time_stamp "HH:MM:SS", answer "A".."D", options ["A. ...", ...], required_ability}]}].
  No question id: the key is `{entry index}.{question index}`.
- OVO-Bench `ovo_bench_new.json`: [{id, task, video, ...}]. Backward (EPM ASI HLD) and real-time (STU OJR
  ATR ACR OCR FPD) items: realtime (s), question, options, gt (option index). Forward items: test_info
  [{realtime, ...}], each test point asked on its own: REC (activity; count), SSR (step; type 0/1),
  CRR (question; type 0/1). The key is `{id}` or `{id}/{test point index}`.
- VStream-QA `test_qa_{ego4d,movienet}.json`: [{video_id, question, id, answer, answer_type, duration,
  start_time, end_time}]: asked at end_time (`time` wins when present); `video` may name the file
  (the real-time `rvs_*` clips).
- Multiple-choice files (EgoSchema / MLVU / Video-MME style): [{video | video_id | videoID, question,
  options | candidates, answer (letter, index or option text), id | question_id | uid, task_type |
  question_type | task, time}]; without time the question is asked at the end of the video.

An item with a bad or missing field becomes one problem line naming the file, the item and the field;
every other item is kept.
"""

import json
import os
import re

BENCHMARKS = ("streamingbench", "ovobench", "vstream", "mcq")

# OVO-Bench's three categories and their tasks (its constant.py / main.py), in its order
OVO_CATEGORIES = {
    "Backward Tracing": ("EPM", "ASI", "HLD"),
    "Real-Time Visual Perception": ("STU", "OJR", "ATR", "ACR", "OCR", "FPD"),
    "Forward Active Responding": ("REC", "SSR", "CRR"),
}
OVO_TASK_CATEGORY = {t: c for c, tasks in OVO_CATEGORIES.items() for t in tasks}
OVO_FORWARD = OVO_CATEGORIES["Forward Active Responding"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER_PREFIX = re.compile(r"^\(?([A-Z])[.):]\s*")  # "A. text", "(A) text", "A) text"
YES_NO = ("No", "Yes")  # choices of a yes/no question: index = the annotation's `type` (0 no, 1 yes)

# The prompts, in this project's words, with what each benchmark's own prompt asks for.
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
REC_PROMPT = ("People in the video may repeat one kind of action; 'they' below means whoever performs it. "
              "How many times did they {activity} so far? One complete motion counts once. "
              "Answer with a single number.")
SSR_PROMPT = ("This is a tutorial made of steps. Is the person in the video performing this step right now: "
              "{step}\nAnswer only Yes or No.")
CRR_PROMPT = ("{question}\nDoes what the video has shown so far, the latest frames above all, give enough "
              "information to answer this question? Answer only Yes or No.")


class AnnotationProblem(ValueError):
    """One item of an annotation file that cannot be used; the message names the file and the item."""


def option_texts(options):
    """Option texts without their letters: ["A. red", "B. blue"] -> ["red", "blue"] (bare texts stay)."""
    texts = []
    for k, o in enumerate(options):
        o = str(o).strip()
        m = _LETTER_PREFIX.match(o)
        texts.append(o[m.end():] if m and m.group(1) == LETTERS[k] else o)
    return texts


def mcq_prompt(question, options):
    """The question, its options as `A. text` lines, and the answer-with-a-letter instruction."""
    lines = [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)]
    return f"{question}\n" + "\n".join(lines) + f"\n{MCQ_INSTRUCTION}"


def parse_clock(value):
    """Seconds of "HH:MM:SS" / "MM:SS" / "SS" (parts may carry decimals) or of a number."""
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        parts = value.strip().split(":")
        if len(parts) > 3:
            raise ValueError(f"not a time: {value!r}")
        seconds = 0.0
        for part in parts:
            seconds = 60 * seconds + float(part)
    else:
        raise ValueError(f"not a time: {value!r}")
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"not a time >= 0: {value!r}")
    return seconds


def format_clock(seconds):
    """12.0 -> "00:00:12" (StreamingBench's time_stamp; whole seconds)."""
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------- field checks

def _need(item, field, where, kind=None):
    if not isinstance(item, dict) or field not in item or item[field] is None:
        raise AnnotationProblem(f"{where}: missing '{field}'")
    value = item[field]
    if kind == "text" and (not isinstance(value, str) or not value.strip()):
        raise AnnotationProblem(f"{where}: '{field}' must be a non-empty string, got {value!r}")
    if kind == "list" and (not isinstance(value, list) or not value):
        raise AnnotationProblem(f"{where}: '{field}' must be a non-empty list, got {value!r}")
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise AnnotationProblem(f"{where}: '{field}' must be an integer, got {value!r}")
    return value


def _time(item, field, where):
    try:
        return parse_clock(_need(item, field, where))
    except ValueError as exc:
        raise AnnotationProblem(f"{where}: '{field}' {exc}") from None


def _options(item, field, where):
    options = _need(item, field, where, "list")
    if len(options) < 2 or len(options) > len(LETTERS) or not all(isinstance(o, (str, int, float)) for o in options):
        raise AnnotationProblem(f"{where}: '{field}' must list 2..26 options, got {options!r}")
    return option_texts(options)


def _letter_index(value, options, where, field="answer"):
    """Index of an answer given as a letter ("B", "(B)", "B. text"), an index or an option's text."""
    if isinstance(value, int) and not isinstance(value, bool):
        idx = value
    elif isinstance(value, str):
        v = value.strip()
        m = re.match(r"^\(?([A-Z])(?:$|[.):\s])", v)
        if m:
            idx = LETTERS.index(m.group(1))
        else:
            idx = next((k for k, o in enumerate(options) if o.strip().lower() == v.lower()), None)
    else:
        idx = None
    if idx is None or not 0 <= idx < len(options):
        raise AnnotationProblem(f"{where}: '{field}' {value!r} names none of the {len(options)} options")
    return idx


# ---------------------------------------------------------------- the benchmarks

def _numbered(data, path, what):
    """The items of an annotation file that must be a JSON list, numbered."""
    if not isinstance(data, list):
        raise AnnotationProblem(f"{path}: expected a JSON list of {what}")
    return enumerate(data)


def _identified(item, path, n):
    """An item's `id` and the place that names it in problems; raises when the item has no id."""
    item_id = _need(item, "id", f"{path}: item {n}")
    return item_id, f"{path}: item {n} (id {item_id!r})"


def _streamingbench(data, path):
    for n, entry in _numbered(data, path, "videos with their questions"):
        where = f"{path}: entry {n}"
        try:
            video = _need(entry, "video_path", where, "text")
            questions = _need(entry, "questions", where, "list")
        except AnnotationProblem as exc:
            yield exc
            continue
        for k, q in enumerate(questions):
            qwhere = f"{where} ({video}) question {k}"
            try:
                task = _need(q, "task_type", qwhere, "text")
                text = _need(q, "question", qwhere, "text")
                t = _time(q, "time_stamp", qwhere)
                answer = _need(q, "answer", qwhere, "text").strip()
                choices = _options(q, "options", qwhere) if q.get("options") is not None else None
                gt_index = _letter_index(answer, choices, qwhere) if choices else None
            except AnnotationProblem as exc:
                yield exc
                continue
            yield {"key": f"{n}.{k}", "video": video, "question": text, "time": t,
                   "prompt": mcq_prompt(text, choices) if choices else text, "choices": choices,
                   "gt": answer, "gt_index": gt_index, "rule": "first_letter", "task": task, "category": None,
                   "ids": {"task_type": task, "time_stamp": q["time_stamp"], "entry": n, "index": k}}


def _ovobench(data, path):
    for n, item in _numbered(data, path, "OVO-Bench items"):
        try:
            item_id, where = _identified(item, path, n)
            task = _need(item, "task", where, "text")
            if task not in OVO_TASK_CATEGORY:
                raise AnnotationProblem(f"{where}: unknown task {task!r} (known: {', '.join(OVO_TASK_CATEGORY)})")
            video = _need(item, "video", where, "text")
        except AnnotationProblem as exc:
            yield exc
            continue
        base = {"video": video, "task": task, "category": OVO_TASK_CATEGORY[task]}
        if task not in OVO_FORWARD:
            try:
                text = _need(item, "question", where, "text")
                choices = _options(item, "options", where)
                gt = _need(item, "gt", where, "int")
                if not 0 <= gt < len(choices):
                    raise AnnotationProblem(f"{where}: 'gt' {gt} is outside the {len(choices)} options")
                t = _time(item, "realtime", where)
            except AnnotationProblem as exc:
                yield exc
                continue
            yield {**base, "key": str(item_id), "question": text, "time": t, "prompt": mcq_prompt(text, choices),
                   "choices": choices, "gt": LETTERS[gt], "gt_index": gt, "rule": "ovo_choice",
                   "ids": {"id": item_id, "task": task}}
            continue
        try:
            tests = _need(item, "test_info", where, "list")
            if task == "REC":
                text = REC_PROMPT.format(activity=_need(item, "activity", where, "text"))
            elif task == "CRR":
                text = CRR_PROMPT.format(question=_need(item, "question", where, "text"))
        except AnnotationProblem as exc:
            yield exc
            continue
        for i, test in enumerate(tests):
            twhere = f"{where} test_info {i}"
            try:
                t = _time(test, "realtime", twhere)
                if task == "REC":
                    count = _need(test, "count", twhere, "int")
                    query = {"question": text, "prompt": text, "choices": None, "gt": count, "gt_index": None,
                             "rule": "ovo_count"}
                else:
                    kind = _need(test, "type", twhere, "int")
                    if kind not in (0, 1):
                        raise AnnotationProblem(f"{twhere}: 'type' must be 0 (no) or 1 (yes), got {kind!r}")
                    prompt = SSR_PROMPT.format(step=_need(test, "step", twhere, "text")) if task == "SSR" else text
                    query = {"question": prompt, "prompt": prompt, "choices": list(YES_NO), "gt": kind,
                             "gt_index": kind, "rule": "ovo_yes_no"}
            except AnnotationProblem as exc:
                yield exc
                continue
            yield {**base, **query, "key": f"{item_id}/{i}", "time": t,
                   "ids": {"id": item_id, "task": task, "test_index": i}}


def _vstream(data, path):
    for n, item in _numbered(data, path, "QA items"):
        try:
            item_id, where = _identified(item, path, n)
            video = item.get("video") or _need(item, "video_id", where)
            text = _need(item, "question", where, "text")
            answer = _need(item, "answer", where)
            t = _time(item, "time" if item.get("time") is not None else "end_time", where)
            if item.get("start_time") is not None and _time(item, "start_time", where) > t:
                raise AnnotationProblem(f"{where}: 'start_time' {item['start_time']!r} is after the question time {t}")
        except AnnotationProblem as exc:
            yield exc
            continue
        task = str(item.get("answer_type") if item.get("answer_type") is not None else "all")
        yield {"key": str(item_id), "video": str(video), "question": text, "time": t, "prompt": text, "choices": None,
               "gt": str(answer), "gt_index": None, "rule": "exact", "task": task, "category": None,
               "ids": {"id": item_id, "video_id": item.get("video_id"), "answer_type": item.get("answer_type"),
                       "start_time": item.get("start_time"), "end_time": item.get("end_time")}}


def _first(item, names):
    return next((item[k] for k in names if isinstance(item, dict) and item.get(k) is not None), None)


def _mcq(data, path):
    if isinstance(data, dict):  # {id: item} (EgoSchema-style question files)
        data = [{"id": k, **v} if isinstance(v, dict) else v for k, v in data.items()]
    if not isinstance(data, list):
        raise AnnotationProblem(f"{path}: expected a JSON list (or an id -> item object) of questions")
    for n, item in enumerate(data):
        item_id = _first(item, ("id", "question_id", "uid", "q_uid"))
        where = f"{path}: item {n}" + ("" if item_id is None else f" (id {item_id!r})")
        try:
            video = _first(item, ("video", "video_id", "videoID", "video_path"))
            if video is None:
                raise AnnotationProblem(f"{where}: missing 'video' (or video_id / videoID / video_path)")
            text = _need(item, "question", where, "text")
            field = "options" if item.get("options") is not None else "candidates"
            choices = _options(item, field, where)
            gt_index = _letter_index(_need(item, "answer", where), choices, where)
            t = _time(item, "time", where) if item.get("time") is not None else None
        except AnnotationProblem as exc:
            yield exc
            continue
        task = str(_first(item, ("task_type", "question_type", "task")) or "all")
        yield {"key": str(n if item_id is None else item_id), "video": str(video), "question": text, "time": t,
               "prompt": mcq_prompt(text, choices), "choices": choices, "gt": LETTERS[gt_index],
               "gt_index": gt_index, "rule": "option", "task": task, "category": None,
               "ids": {"id": item_id, "task_type": task}}


PARSERS = {"streamingbench": _streamingbench, "ovobench": _ovobench, "vstream": _vstream, "mcq": _mcq}


def load_annotations(benchmark, path):
    """(queries, problems) of one annotation file; problems are messages naming the file and the item.
    A file that is not JSON (or not the benchmark's top-level shape) raises AnnotationProblem."""
    if benchmark not in PARSERS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise AnnotationProblem(f"{path}: not JSON ({exc})") from None
    queries, problems, seen = [], [], {}
    for out in PARSERS[benchmark](data, path):
        if isinstance(out, AnnotationProblem):
            problems.append(str(out))
            continue
        if out["key"] in seen:  # a repeated id: later copies are told apart, never merged
            seen[out["key"]] += 1
            out["key"] = f"{out['key']}#{seen[out['key']]}"
        else:
            seen[out["key"]] = 0
        queries.append(out)
    return queries, problems


def group_by_video(queries):
    """[(video, [queries in time order])] in order of each video's first query (a question without a time,
    asked at the end of the video, comes last)."""
    groups = {}
    for q in queries:
        groups.setdefault(q["video"], []).append(q)
    end = float("inf")
    return [(v, sorted(qs, key=lambda q: end if q["time"] is None else q["time"])) for v, qs in groups.items()]


# ---------------------------------------------------------------- the demo's synthetic benchmark

def export_synthetic_streamingbench(qa_file, output_file, num_options=4, seed=0):
    """Write the demo's synthetic test set (`test_qa.json` from flash_vstream.demo.synthetic) as a
    StreamingBench `questions_real.json`: each open question becomes a multiple-choice one whose wrong
    options are drawn (seeded) from the answer's own vocabulary (colours, shapes, yes / no; otherwise the
    family's other answers), `task_type` is the family, `time_stamp` the question time and `video_path` the
    item's video path (relative to the data folder). Returns the count."""
    import random

    from flash_vstream.demo.synthetic import COLORS, SHAPES

    vocabularies = [list(COLORS), list(SHAPES), ["yes", "no"]]
    with open(qa_file, encoding="utf-8") as f:
        items = json.load(f)
    answers = {}
    for it in items:
        answers.setdefault(it["answer_type"], [])
        if it["answer"] not in answers[it["answer_type"]]:
            answers[it["answer_type"]].append(it["answer"])
    rng = random.Random(seed)
    entries = []
    for it in items:
        # wrong options of the answer's own kind (a colour for a colour), else the family's other answers
        kind = next((v for v in vocabularies if it["answer"] in v), answers[it["answer_type"]])
        others = [a for a in kind if a != it["answer"]]
        options = [it["answer"], *rng.sample(others, min(num_options - 1, len(others)))]
        if len(options) < 2:
            raise ValueError(f"{qa_file}: item {it.get('id')!r}: no wrong option for answer {it['answer']!r}")
        rng.shuffle(options)
        right = options.index(it["answer"])
        t = float(it.get("time", it.get("duration", 0)))
        entries.append({
            "time": f"[{format_clock(max(0.0, t - 10))} - {format_clock(t)}]",
            "questions": [{"task_type": it["answer_type"], "question": it["question"], "time_stamp": format_clock(t),
                           "answer": LETTERS[right], "options": [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)],
                           "required_ability": "synthetic"}],
            "video_categories": "synthetic",
            "video_path": it.get("video") or f"{it['video_id']}.mp4",
        })
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    from flash_vstream.utils.files import write_json

    write_json(output_file, entries)
    return len(entries)


def main(argv=None):
    """`python -m flash_vstream.eval_video.streaming_bench.loaders --synthetic-qa QA --output FILE`."""
    import argparse

    p = argparse.ArgumentParser(description="Export the demo's synthetic test set as a StreamingBench file.")
    p.add_argument("--synthetic-qa", required=True, help="test_qa.json written by flash_vstream.demo.synthetic")
    p.add_argument("--output", required=True, help="the StreamingBench-format annotation file to write")
    p.add_argument("--num-options", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = export_synthetic_streamingbench(args.synthetic_qa, args.output, args.num_options, args.seed)
    print(f"{n} question(s) -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

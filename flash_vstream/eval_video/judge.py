"""Judge open-ended predictions with the Video-ChatGPT protocol through any OpenAI-compatible server.

    python -m flash_vstream.eval_video.judge --pred-file F.jsonl --output-dir DIR \
        [--judge-model gpt-3.5-turbo-0125] [--judge-base-url URL] [--api-key KEY] [--num-workers 8]

For every prediction the judge is asked whether it matches the correct answer ('yes'/'no') and
for an integer score 0-5. Each outcome becomes one line of DIR/judgements.jsonl, written whole
and fsynced as soon as it arrives: `{key, id, answer_type, status: "ok"|"failed", verdict,
score, raw, error, attempts, judge_model, protocol, pred_hash, prediction, time}`. A rerun
judges only keys without an "ok" line, so a killed run resumes where it stopped. Then
DIR/results.json, DIR/results.csv and a table come from `aggregate.report`.

Differences from the published script, each deliberate:
- openai >= 1 client with a pinned model instead of the legacy module and "gpt-3.5-turbo";
- temperature 0 (upstream 0.002, the lowest its API then allowed);
- the prompt's example score is an integer (upstream showed 4.8 and then truncated with int());
- retries are per request with exponential backoff, and an item that never gets a verdict is
  recorded and counted as failed, never dropped;
- verdicts from another judge model or another prediction file are never mixed in.
The API key is never printed or written: every line and message passes through a redactor.
"""

import argparse
import ast
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import openai

from flash_vstream.eval_video.aggregate import is_missing, load_predictions, report
from flash_vstream.utils.files import ResumableJsonl, StaleFile, file_sha256

DEFAULT_JUDGE_MODEL = "gpt-3.5-turbo-0125"
PROTOCOL = "video-chatgpt-v1"  # bump when the prompt or the parsing changes meaning
JUDGEMENTS = "judgements.jsonl"
EXIT_FAILED = 2    # some items got no verdict (results are still written)
EXIT_REFUSED = 3   # DIR holds verdicts of another run and --on-mismatch refuse
PLACEHOLDER_KEY = "EMPTY"  # sent to a custom server when no key is configured; not a secret

SYSTEM_PROMPT = (
    "You evaluate answers that a model generated for questions about videos. "
    "Given a question, its correct answer and a predicted answer, decide whether the "
    "prediction matches the correct answer in meaning. Guidelines:\n"
    "- Judge whether the meaning agrees, not whether the wording is the same.\n"
    "- Synonyms, paraphrases and equivalent expressions count as a match.\n"
    "- A prediction that contradicts the correct answer or lacks its key point does not match.\n"
    "- Score how well the prediction matches, from 0 (not at all) to 5 (fully)."
)

USER_PROMPT = (
    "Please evaluate this question-answer pair.\n\n"
    "Question: {question}\n"
    "Correct answer: {answer}\n"
    "Predicted answer: {pred}\n\n"
    "Reply with a Python dictionary string only, with no other text or explanation. "
    "Use the key 'pred' with the value 'yes' if the predicted answer matches the correct "
    "answer and 'no' if it does not, and the key 'score' with an integer from 0 to 5 for the "
    "degree of match, 5 meaning a full match. For example: {{'pred': 'yes', 'score': 4}}."
)


def build_messages(question, answer, pred):
    """Chat messages asking for one verdict."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer, pred=pred)},
    ]


# ---------------------------------------------------------------- reply parsing

class VerdictParseError(ValueError):
    pass


_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)
_PRED_KV = re.compile(r"""['"]?\bpred['"]?\s*[:=]\s*['"]?\s*(yes|no)\b""", re.I)
_SCORE_KV = re.compile(r"""['"]?\bscore['"]?\s*[:=]\s*['"]?\s*(-?\d+(?:\.\d+)?)""", re.I)


def _candidates(text):
    """Spans of a reply that may hold the dict: fenced blocks, each balanced {...}, the whole text."""
    for m in _FENCE.finditer(text):
        yield m.group(1).strip()
    for start, c in enumerate(text):
        if c != "{":
            continue
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                yield text[start:end + 1]
                break
    yield text


def _as_mapping(span):
    for load in (ast.literal_eval, json.loads):
        try:
            obj = load(span)
        except Exception:  # literal_eval raises ValueError, SyntaxError, TypeError, MemoryError...
            continue
        if isinstance(obj, dict):
            return obj
    pred, score = _PRED_KV.search(span), _SCORE_KV.search(span)
    if pred and score:  # dict-like text no parser accepts, e.g. {pred: yes, score: 4}
        return {"pred": pred.group(1), "score": score.group(1)}
    return None


def _verdict_from(mapping):
    fields = {str(k).strip().lower(): v for k, v in mapping.items()}
    pred, score = fields.get("pred"), fields.get("score")
    if isinstance(pred, bool):
        pred = "yes" if pred else "no"
    word = pred.strip(" .!'\"").lower() if isinstance(pred, str) else None
    if word not in ("yes", "no"):
        raise VerdictParseError(f"'pred' is {pred!r}, not yes/no")
    if isinstance(score, str):
        try:
            score = float(score.strip())
        except ValueError:
            raise VerdictParseError(f"'score' is {score!r}, not a number") from None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise VerdictParseError(f"'score' is {score!r}, not a number")
    if not 0 <= score <= 5:
        raise VerdictParseError(f"'score' {score} is outside 0..5")
    # Round half up; upstream's int() truncated 4.8 to 4.
    return word, int(math.floor(score + 0.5))


def parse_verdict(text):
    """('yes'|'no', int score 0..5) from a judge reply, or VerdictParseError.

    Accepts Python-dict text, JSON, ```json fenced blocks, prose around the dict, any case of
    yes/no, and scores 4 / "4" / 4.0 (floats are rounded, never truncated).
    """
    if not isinstance(text, str) or not text.strip():
        raise VerdictParseError("empty reply")
    reason = "no dict with 'pred' and 'score' found"
    for span in _candidates(text):
        mapping = _as_mapping(span)
        if mapping is None:
            continue
        try:
            return _verdict_from(mapping)
        except VerdictParseError as exc:
            reason = str(exc)
    raise VerdictParseError(reason)


# ---------------------------------------------------------------- one request, with retries

@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6     # retries after the first attempt
    base: float = 1.0        # seconds before the first retry; doubles each time
    max_delay: float = 60.0

    def delay(self, retry, retry_after=None):
        """Seconds to wait before retry number `retry` (0-based), with up to 10% jitter; a
        server's Retry-After is honoured up to max_delay."""
        d = min(self.max_delay, self.base * 2 ** retry)
        d += random.uniform(0, 0.1 * d)
        if retry_after:
            d = max(d, min(retry_after, self.max_delay))
        return d


def _retryable(exc):
    """Rate limits, timeouts, connection errors and server errors are worth another try."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


def _retry_after(exc):
    response = getattr(exc, "response", None)
    try:
        return float(response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None


def _reply_text(completion):
    try:
        return completion.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        return None


def judge_item(client, judge_model, record, policy=RetryPolicy(), sleep=time.sleep):
    """Ask `client` for one verdict on a prediction record, retrying per `policy`.

    Returns {status: "ok"|"failed", verdict, score, raw, error, attempts}; `raw` is the last
    reply text received (kept for failed items too), `error` why the last attempt failed.
    """
    messages = build_messages(record.get("question", ""), record.get("answer", ""), record["pred"])
    raw, error, retry_after = None, None, None
    for attempt in range(policy.max_retries + 1):
        if attempt:
            sleep(policy.delay(attempt - 1, retry_after))
        retry_after = None
        try:
            completion = client.chat.completions.create(model=judge_model, messages=messages, temperature=0)
        except openai.OpenAIError as exc:
            error = f"{type(exc).__name__}: {exc}"
            if not _retryable(exc):
                break
            retry_after = _retry_after(exc)
            continue
        raw = _reply_text(completion)
        try:
            verdict, score = parse_verdict(raw)
        except VerdictParseError as exc:
            error = f"unparseable reply: {exc}"
            continue
        return {"status": "ok", "verdict": verdict, "score": score, "raw": raw, "error": None,
                "attempts": attempt + 1}
    return {"status": "failed", "verdict": None, "score": None, "raw": raw, "error": error,
            "attempts": attempt + 1}


# ---------------------------------------------------------------- the judgements file

def record_hash(record):
    """Content hash of one prediction record; a stored verdict is reused only for the same hash."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _valid(rec):
    if not isinstance(rec.get("key"), str) or rec.get("status") not in ("ok", "failed"):
        return False
    return rec["status"] == "failed" or (rec.get("verdict") in ("yes", "no") and rec.get("score") in range(6))


def judgements_store(path, items, judge_model, on_mismatch="fresh", log=print):
    """The resumable judgements file of this judge on these prediction items.

    An "ok" verdict is finished; failures are judged again. A verdict from another judge model
    or protocol, or on a prediction that is not in `items` as it is now, belongs to another run.
    """
    hashes = {key: record_hash(rec) for key, rec in items}

    def foreign(rec):
        if not _valid(rec) or (rec.get("judge_model") == judge_model and rec.get("protocol") == PROTOCOL
                               and hashes.get(rec["key"]) == rec.get("pred_hash")):
            return None
        return f"key {rec['key']!r}, judge '{rec.get('judge_model')}'"

    return ResumableJsonl(path, key=lambda rec: rec["key"], is_done=lambda rec: _valid(rec) and rec["status"] == "ok",
                          foreign=foreign, on_mismatch=on_mismatch, log=log,
                          another_run=f"another run (not verdicts of judge '{judge_model}' ({PROTOCOL}) "
                                      f"on the current prediction file)")


# ---------------------------------------------------------------- the run

def make_client(api_key=None, base_url=None, timeout=60.0, azure_endpoint=None, api_version=None):
    """An openai client with its own retries off (judge_item retries, and records each attempt).

    The key comes from `api_key`, else AZURE_OPENAI_API_KEY (Azure only), else OPENAI_API_KEY;
    a custom server (base_url or OPENAI_BASE_URL) without any key gets PLACEHOLDER_KEY, which
    local servers accept.
    """
    if azure_endpoint:
        key = api_key or os.environ.get("AZURE_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ValueError("no API key: pass --api-key or set AZURE_OPENAI_API_KEY / OPENAI_API_KEY")
        return openai.AzureOpenAI(api_key=key, azure_endpoint=azure_endpoint, api_version=api_version,
                                  timeout=timeout, max_retries=0)
    custom_server = base_url or os.environ.get("OPENAI_BASE_URL")
    key = api_key or os.environ.get("OPENAI_API_KEY") or (PLACEHOLDER_KEY if custom_server else None)
    if not key:
        raise ValueError("no API key: pass --api-key or set OPENAI_API_KEY")
    return openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)


def redactor(secret):
    """A function that replaces `secret` in a string by '***'."""
    if not secret or secret == PLACEHOLDER_KEY or len(secret) < 4:
        return lambda text: text
    return lambda text: text.replace(secret, "***")


def run_judge(pred_file, output_dir, client, judge_model=DEFAULT_JUDGE_MODEL, num_workers=8,
              policy=RetryPolicy(), on_mismatch="fresh", qa_file=None, out=None):
    """Judge every prediction of `pred_file` that has no verdict in DIR/judgements.jsonl yet,
    then write DIR/results.json and DIR/results.csv and print the table. Returns the results
    dict (its "failed" counts items without a verdict)."""
    redact = redactor(getattr(client, "api_key", None))

    def log(msg):
        print(redact(msg), file=sys.stderr, flush=True)

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, JUDGEMENTS)
    items = load_predictions(pred_file, qa_file, log=log)
    store = judgements_store(path, items, judge_model, on_mismatch, log=log)
    done = store.load()
    pending = [(key, rec) for key, rec in items if not is_missing(rec) and key not in done]
    log(f"judge '{judge_model}': {len(items)} items, {len(done)} already judged, {len(pending)} to judge")

    if pending:
        pool = ThreadPoolExecutor(max_workers=max(1, num_workers))
        try:
            with store.appender() as append:
                futures = {pool.submit(judge_item, client, judge_model, rec, policy): (key, rec)
                           for key, rec in pending}
                for n, fut in enumerate(as_completed(futures), 1):
                    key, rec = futures[fut]
                    line = {"key": key, "id": rec.get("id"), "answer_type": rec.get("answer_type"),
                            **fut.result(), "judge_model": judge_model, "protocol": PROTOCOL,
                            "pred_hash": record_hash(rec), "prediction": rec, "time": round(time.time(), 3)}
                    append(redact(json.dumps(line, ensure_ascii=False)))
                    if line["status"] == "ok":
                        done[key] = line
                    else:
                        log(f"no verdict for {key} after {line['attempts']} attempt(s): {line['error']}")
                    if n % 100 == 0 or n == len(pending):
                        log(f"judged {n}/{len(pending)}")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    extra = {
        "protocol": PROTOCOL,
        "judge_base_url": redact(str(client.base_url)),
        "pred_file": os.path.abspath(pred_file),
        "pred_file_sha256": file_sha256(pred_file),
        "pred_models": sorted({str(rec["model"]) for _, rec in items if rec.get("model") is not None}),
    }
    verdicts = {key: {"verdict": r["verdict"], "score": r["score"]} for key, r in done.items()}
    return report(items, verdicts, judge_model, output_dir, extra=extra, out=out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Judge video QA predictions (Video-ChatGPT protocol).")
    p.add_argument("--pred-file", required=True, help="JSONL predictions {id, question, answer, answer_type, pred}")
    p.add_argument("--output-dir", required=True, help="gets judgements.jsonl, results.json, results.csv")
    p.add_argument("--judge-model", default=DEFAULT_JUDGE_MODEL, help="model (Azure: deployment) name")
    p.add_argument("--judge-base-url", default=None, help="any OpenAI-compatible server (default: OPENAI_BASE_URL or OpenAI)")
    p.add_argument("--api-key", default=None, help="default: OPENAI_API_KEY (Azure: AZURE_OPENAI_API_KEY too)")
    p.add_argument("--azure-endpoint", default=None, help="use Azure OpenAI at this endpoint")
    p.add_argument("--api-version", default=None, help="Azure API version (default: OPENAI_API_VERSION)")
    p.add_argument("--num-workers", type=int, default=8, help="concurrent requests")
    p.add_argument("--max-retries", type=int, default=6, help="retries per item after the first attempt")
    p.add_argument("--backoff-base", type=float, default=1.0, help="seconds before the first retry, doubling")
    p.add_argument("--max-backoff", type=float, default=60.0, help="longest wait between retries")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--qa-file", default=None, help="test_qa.json: its items without a prediction count as missing")
    p.add_argument("--on-mismatch", choices=("fresh", "refuse"), default="fresh",
                   help="when DIR holds verdicts of another judge or prediction file: move them aside "
                        "and start over (fresh) or stop with exit code 3 (refuse)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    secret = args.api_key
    try:
        client = make_client(args.api_key, args.judge_base_url, args.timeout, args.azure_endpoint, args.api_version)
        secret = client.api_key
        result = run_judge(args.pred_file, args.output_dir, client, args.judge_model, args.num_workers,
                           RetryPolicy(args.max_retries, args.backoff_base, args.max_backoff),
                           args.on_mismatch, args.qa_file)
    except StaleFile as exc:
        print(redactor(secret)(str(exc)), file=sys.stderr)
        return EXIT_REFUSED
    except (ValueError, OSError, openai.OpenAIError) as exc:
        print(redactor(secret)(f"error: {exc}"), file=sys.stderr)
        return 1
    if result["failed"]:
        print(f"{result['failed']} item(s) got no verdict; rerun to retry them", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Metrics that need no judge.

- Normalised exact match for short answers (most of MSVD/MSRVTT/VStream are yes/no or one word):
  lower case, punctuation and articles dropped, number words as digits; when the answer is
  yes or no, the prediction's leading yes/no word decides ("Yes, it is." matches "yes").
  Strict equality otherwise: upstream's substring counting is what this replaces.
- Multiple choice by option log-likelihood (`score_options`): the option whose tokens the model
  finds most likely after the prompt, so the model cannot collapse to answering "A".

    python -m flash_vstream.eval_video.metrics --pred-file F.jsonl --output-dir DIR [--mode exact|mcq]

writes DIR/results.json and DIR/results.csv in the judge's shape (`judge_model` "exact_match" or
"multiple_choice", `score` null) and DIR/<mode>.jsonl with each item's normalised forms.
"""

import argparse
import os
import re
import sys

import torch

from flash_vstream.eval_video.aggregate import is_missing, load_predictions, report
from flash_vstream.utils.files import write_jsonl

# ---------------------------------------------------------------- short answers

_ARTICLES = {"a", "an", "the"}
_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_YES = {"yes", "yeah", "yep", "yup", "true", "correct", "right", "sure", "indeed", "certainly",
        "definitely", "absolutely", "affirmative"}
_NO = {"no", "nope", "not", "false", "incorrect", "wrong", "never", "negative"}
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W_]+")


def _tokens(text):
    """Lower-case word and number tokens; "1,000" -> "1000", number words -> digits."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", str(text).lower())
    words = _TOKEN.findall(text)
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w in _TENS and i + 1 < len(words) and 0 < _UNITS.get(words[i + 1], 0) < 10:
            out.append(str(_TENS[w] + _UNITS[words[i + 1]]))  # twenty-one -> 21
            i += 2
            continue
        if w in _TENS or w in _UNITS:
            out.append(str(_TENS.get(w, _UNITS.get(w))))
        elif w.isdigit():
            out.append(str(int(w)))  # "07" -> "7"
        else:
            out.append(w)
        i += 1
    return out


def normalize_answer(text):
    """'The two dogs.' -> '2 dogs'."""
    return " ".join(t for t in _tokens(text) if t not in _ARTICLES)


def yes_no(text):
    """'yes' / 'no' when a reply starts with a yes or no word ("Yes, it is", "Nope."), else None."""
    toks = _tokens(text)
    if toks[:2] == ["of", "course"]:
        return "yes"
    if toks and toks[0] in _YES:
        return "yes"
    if toks and toks[0] in _NO:
        return "no"
    return None


def exact_match(pred, answer):
    """Normalised exact match; for a yes/no answer the prediction's leading yes/no word counts."""
    a = normalize_answer(answer)
    if a in ("yes", "no"):
        return yes_no(pred) == a
    return normalize_answer(pred) == a


def exact_match_verdicts(items):
    """key -> verdict dict for keyed prediction items (items without a prediction are skipped)."""
    verdicts = {}
    for key, rec in items:
        if is_missing(rec):
            continue
        hit = exact_match(rec["pred"], rec.get("answer", ""))
        verdicts[key] = {"verdict": "yes" if hit else "no", "score": None,
                         "answer_norm": normalize_answer(rec.get("answer", "")),
                         "pred_norm": normalize_answer(rec["pred"])}
    return verdicts


# ---------------------------------------------------------------- multiple choice

_LETTER = re.compile(r"^\(([A-Z])\)|^([A-Z])(?:$|[.:)])")


def option_index(value, options=None):
    """Option index from an int, a letter ("B", "(B)", "B.", "B) text") or, given `options`,
    an option's text; None when it names no option."""
    n = len(options) if options is not None else None
    if isinstance(value, int) and not isinstance(value, bool):
        idx = value
    elif isinstance(value, str):
        m = _LETTER.match(value.strip())
        if m:
            idx = ord((m.group(1) or m.group(2))) - ord("A")
        elif options is not None:
            norm = normalize_answer(value)
            idx = next((i for i, o in enumerate(options) if normalize_answer(o) == norm), None)
        else:
            idx = None
    else:
        idx = None
    if idx is None or idx < 0 or (n is not None and idx >= n):
        return None
    return idx


def mcq_verdicts(items):
    """key -> verdict dict for MCQ items `{answer, options?, pred, pred_index?}` (pred_index, as
    `score_options` gives it, wins over the text of pred). An item whose
    answer names no option gets no verdict (it counts as failed, never as wrong or right)."""
    verdicts = {}
    for key, rec in items:
        if is_missing(rec):
            continue
        options = rec.get("options")
        answer = option_index(rec.get("answer"), options)
        if answer is None:
            continue
        pred = rec["pred_index"] if isinstance(rec.get("pred_index"), int) else option_index(rec["pred"], options)
        verdicts[key] = {"verdict": "yes" if pred == answer else "no", "score": None,
                         "answer_index": answer, "pred_index": pred}
    return verdicts


def option_logprobs(model, prompt_ids, options):
    """[(sum of log p, number of tokens)] of each option's tokens following `prompt_ids`.

    model: any callable taking input_ids (B, L) and returning logits (B, L, V) or an object with
    `.logits` (a HF causal LM works; wrap a multimodal model in a lambda that adds its features).
    prompt_ids: ids (list or tensor, (L,) or (1, L); the tensor's device is used).
    options: one list of token ids per option, each non-empty.
    All options run as one batch, right-padded: a causal model's logits at a position do not
    depend on later positions, so the padding needs no attention mask.
    """
    device = prompt_ids.device if torch.is_tensor(prompt_ids) else torch.device("cpu")
    prompt = [int(t) for t in torch.as_tensor(prompt_ids).reshape(-1).tolist()]
    options = [[int(t) for t in o] for o in options]
    if not prompt or not options or not all(options):
        raise ValueError("need a non-empty prompt and non-empty options")
    length = len(prompt) + max(len(o) for o in options)
    input_ids = torch.tensor([prompt + o + [0] * (length - len(prompt) - len(o)) for o in options],
                             device=device)  # (K, L)
    with torch.no_grad():
        out = model(input_ids)
    logits = getattr(out, "logits", out)  # (K, L, V)
    start = len(prompt) - 1  # the position whose logits predict an option's first token
    logp = torch.log_softmax(logits[:, start:-1].float(), dim=-1)  # (K, T, V), T = longest option
    token_logp = logp.gather(-1, input_ids[:, start + 1:].unsqueeze(-1)).squeeze(-1)  # (K, T)
    return [(token_logp[k, :len(o)].sum().item(), len(o)) for k, o in enumerate(options)]


def score_options(model, tokenizer, prompt_ids, options, normalize="mean"):
    """Index of the option the model finds most likely after the prompt.

    options: token-id lists, or strings encoded by `tokenizer` on their own without special
    tokens (pass ids to control how an option joins the prompt). normalize: "sum" compares
    summed log-likelihoods (favours short options), "mean" the per-token mean. Ties go to the
    lower index.
    """
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', not {normalize!r}")
    ids = [tokenizer(o, add_special_tokens=False)["input_ids"] if isinstance(o, str) else o for o in options]
    scores = [s if normalize == "sum" else s / n for s, n in option_logprobs(model, prompt_ids, ids)]
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


# ---------------------------------------------------------------- CLI

MODES = {"exact": ("exact_match", exact_match_verdicts), "mcq": ("multiple_choice", mcq_verdicts)}


def evaluate(pred_file, output_dir, mode="exact", qa_file=None, out=None):
    """Score a prediction file without a judge; writes results like the judge does."""
    name, verdicts_of = MODES[mode]
    items = load_predictions(pred_file, qa_file)
    verdicts = verdicts_of(items)
    os.makedirs(output_dir, exist_ok=True)
    lines = [{"key": k, "id": r.get("id"), "answer_type": r.get("answer_type"), **verdicts[k]}
             for k, r in items if k in verdicts]
    write_jsonl(os.path.join(output_dir, f"{mode}.jsonl"), lines)
    return report(items, verdicts, name, output_dir,
                  extra={"pred_file": os.path.abspath(pred_file)}, out=out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Score video QA predictions without a judge.")
    p.add_argument("--pred-file", required=True, help="JSONL predictions {id, question, answer, answer_type, pred}")
    p.add_argument("--output-dir", required=True, help="gets results.json, results.csv, <mode>.jsonl")
    p.add_argument("--mode", choices=tuple(MODES), default="exact",
                   help="exact: normalised exact match; mcq: option letters/indices (answer, pred or pred_index)")
    p.add_argument("--qa-file", default=None, help="test_qa.json: its items without a prediction count as missing")
    args = p.parse_args(argv)
    evaluate(args.pred_file, args.output_dir, args.mode, args.qa_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())

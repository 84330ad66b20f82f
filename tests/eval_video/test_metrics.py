"""No-judge metrics: normalised exact match and multiple choice by option log-likelihood."""

import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from flash_vstream.demo.tiny import tiny_llama_config
from flash_vstream.eval_video import metrics
from flash_vstream.eval_video.metrics import (
    exact_match, normalize_answer, option_index, option_logprobs, score_options, yes_no,
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------- exact match

@pytest.mark.parametrize("text, norm", [
    ("The Dog.", "dog"), ("  a  cat, an apple!", "cat apple"), ("Two", "2"), ("twenty-one", "21"),
    ("1,000 people", "1000 people"), ("3.5 meters", "3.5 meters"), ("07", "7"), ("", ""),
])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


@pytest.mark.parametrize("pred, answer, hit", [
    ("yes", "yes", True), ("Yes.", "yes", True), ("Yes, it is.", "yes", True), ("YES", "Yes", True),
    ("Yeah, he does", "yes", True), ("of course", "yes", True), ("No, it is not.", "no", True),
    ("Nope", "no", True), ("no", "yes", False), ("yes", "no", False),
    ("It is not.", "no", False),        # no leading yes/no word: not guessed
    ("The man is running", "yes", False),
    ("two", "2", True), ("2", "two", True), ("Two dogs.", "2 dogs", True), ("the kitchen", "Kitchen", True),
    ("a cat is sitting", "cat", False),  # strict: upstream's substring match is what this replaces
    ("dogs", "dog", False), ("three", "2", False),
])
def test_exact_match(pred, answer, hit):
    assert exact_match(pred, answer) is hit


def test_yes_no():
    assert yes_no("Yes, it is") == "yes" and yes_no("no.") == "no" and yes_no("maybe") is None and yes_no("") is None


def test_exact_match_cli_writes_results_in_the_judge_shape(tmp_path, capsys):
    records = [
        {"id": 1, "question": "is it raining?", "answer": "yes", "answer_type": "yesno", "pred": "Yes, it is."},
        {"id": 2, "question": "is he sitting?", "answer": "no", "answer_type": "yesno", "pred": "No."},
        {"id": 3, "question": "is it day?", "answer": "yes", "answer_type": "yesno", "pred": "no"},
        {"id": 4, "question": "how many dogs?", "answer": "two", "answer_type": "number", "pred": "2"},
        {"id": 5, "question": "what animal?", "answer": "the dog", "answer_type": "other", "pred": "A dog."},
        {"id": 6, "question": "what animal?", "answer": "cat", "answer_type": "other", "pred": "a cat is sitting"},
        {"id": 7, "question": "what?", "answer": "x", "answer_type": "other", "error": "feature file not found"},
    ]
    pred_file = tmp_path / "preds.jsonl"
    write_jsonl(pred_file, records)
    out = tmp_path / "out"
    assert metrics.main(["--pred-file", str(pred_file), "--output-dir", str(out)]) == 0
    res = json.load(open(out / "results.json"))
    assert res["judge_model"] == "exact_match" and res["score"] is None
    assert (res["total"], res["judged"], res["failed"], res["missing"]) == (7, 6, 0, 1)
    assert res["accuracy"] == pytest.approx(4 / 6)
    assert res["by_type"]["yesno"]["accuracy"] == pytest.approx(2 / 3)
    assert res["by_type"]["number"]["accuracy"] == 1.0
    assert res["by_type"]["other"]["accuracy"] == 0.5 and res["by_type"]["other"]["missing"] == 1
    assert "by_type_prefix" not in res
    per_item = [json.loads(line) for line in (out / "exact.jsonl").read_text().splitlines()]
    assert [p["verdict"] for p in per_item] == ["yes", "yes", "no", "yes", "yes", "no"]
    assert per_item[4]["answer_norm"] == "dog" and per_item[4]["pred_norm"] == "dog"
    assert (out / "results.csv").read_text().splitlines()[1].startswith("all,all,0.666")
    assert "exact_match" in capsys.readouterr().out


# ---------------------------------------------------------------- multiple choice: answers

@pytest.mark.parametrize("value, options, index", [
    ("B", None, 1), ("(C)", None, 2), ("A.", None, 0), ("D) a red car", None, 3), ("A: yes", None, 0),
    (2, None, 2), (True, None, None), ("A man walks", None, None), ("E", ["a", "b"], None),
    ("the red car", ["a blue car", "A red car."], 1), ("green", ["a", "b"], None), (-1, None, None),
])
def test_option_index(value, options, index):
    assert option_index(value, options) == index


def test_mcq_cli_accuracy(tmp_path):
    opts = ["a dog", "a red car", "a cat"]
    records = [
        {"id": 1, "answer": "B", "options": opts, "pred": "B", "answer_type": "mc"},
        {"id": 2, "answer": 2, "options": opts, "pred": "(C) a cat", "answer_type": "mc"},
        {"id": 3, "answer": "A", "options": opts, "pred": "A", "pred_index": 1, "answer_type": "mc"},
        {"id": 4, "answer": "the red car", "options": opts, "pred": "B.", "answer_type": "mc"},
        {"id": 5, "answer": "A", "options": opts, "pred": "D.", "answer_type": "mc"},   # names no option
        {"id": 6, "answer": "Z", "options": opts, "pred": "A", "answer_type": "mc"},    # bad answer: no verdict
        {"id": 7, "answer": "A", "options": opts, "answer_type": "mc", "error": "no features"},
    ]
    pred_file = tmp_path / "mcq.jsonl"
    write_jsonl(pred_file, records)
    res = metrics.evaluate(str(pred_file), str(tmp_path / "out"), mode="mcq", out=open("/dev/null", "w"))
    assert res["judge_model"] == "multiple_choice"
    assert (res["total"], res["judged"], res["failed"], res["missing"]) == (7, 5, 1, 1)
    assert (res["yes"], res["no"]) == (3, 2) and res["accuracy"] == 0.6
    assert res["failed_keys"] == ["6"]


# ---------------------------------------------------------------- multiple choice: log-likelihood

def bigram_model(vocab=8):
    """A stub LM whose next-token distribution depends on the current token only, with designed
    log-probs: after 1, p(2) = e^-1 and p(3) = e^-0.5; after 3, p(4) = e^-0.5; after 4, p(5) = e^-0.5."""
    designed = {1: {2: math.exp(-1), 3: math.exp(-0.5)}, 3: {4: math.exp(-0.5)}, 4: {5: math.exp(-0.5)}}
    table = torch.full((vocab, vocab), 1.0 / vocab)
    for cur, nxt in designed.items():
        rest = (1 - sum(nxt.values())) / (vocab - len(nxt))
        table[cur] = rest
        for tok, p in nxt.items():
            table[cur, tok] = p
    logits = table.log()  # (V, V)
    return lambda input_ids: logits[input_ids]  # (B, L, V)


class CharTokenizer:
    """Maps letters to ids like a HF tokenizer call: tok(text, add_special_tokens=False)["input_ids"]."""
    ids = {"x": 2, "y": 3, "z": 4, "w": 5}

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [self.ids[c] for c in text]}


def test_option_logprobs_with_designed_logits():
    model = bigram_model()
    lp = option_logprobs(model, [0, 1], [[2], [3, 4, 5]])
    assert [n for _, n in lp] == [1, 3]
    assert lp[0][0] == pytest.approx(-1.0, abs=1e-5) and lp[1][0] == pytest.approx(-1.5, abs=1e-5)
    # summed favours the short option A, the per-token mean the long option B
    assert score_options(model, None, [0, 1], [[2], [3, 4, 5]], normalize="sum") == 0
    assert score_options(model, None, [0, 1], [[2], [3, 4, 5]], normalize="mean") == 1
    # strings through a tokenizer, a (1, L) tensor prompt, and a tie going to the lower index
    assert score_options(model, CharTokenizer(), torch.tensor([[0, 1]]), ["x", "yzw"], normalize="mean") == 1
    assert score_options(model, None, [0, 1], [[6], [7], [6]], normalize="sum") == 0
    with pytest.raises(ValueError):
        score_options(model, None, [0, 1], [[2]], normalize="max")
    with pytest.raises(ValueError):
        option_logprobs(model, [0, 1], [[2], []])


def test_option_logprobs_match_manual_computation_on_tiny_llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(64, hidden_size=32, num_layers=2, num_heads=4)).eval()
    prompt = [1, 17, 42, 5, 9]
    options = [[3], [20, 21, 22, 23], [40, 7], [63, 0, 11]]
    got = option_logprobs(model, torch.tensor(prompt), options)  # one right-padded batch
    manual = []
    for opt in options:  # each option alone, unpadded
        with torch.no_grad():
            logits = model(torch.tensor([prompt + opt])).logits[0]  # (L, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        manual.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(opt)))
    assert [n for _, n in got] == [1, 4, 2, 3]
    assert [s for s, _ in got] == pytest.approx(manual, abs=1e-4)
    for normalize, denom in (("sum", [1] * 4), ("mean", [1, 4, 2, 3])):
        scores = [m / d for m, d in zip(manual, denom)]
        assert score_options(model, None, prompt, options, normalize=normalize) == scores.index(max(scores))

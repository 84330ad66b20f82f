"""Continuous batching (runtime/batch_decoder.py): answers through the batch equal lone answers, token for token."""

import pytest
import torch

from flash_vstream.constants import IMAGE_TOKEN_INDEX
from flash_vstream.demo.tiny import tiny_vstream_model
from flash_vstream.runtime.batch_decoder import BatchDecoder, BatchRequest, kv_bytes_per_slot

from support.decoding import reference

EOS = 2


@pytest.fixture(scope="module")
def model():
    return tiny_vstream_model(0)


def _question(gen, model, prompt_len, memory_len):
    """(L,) prompt ids with one <image> and (N, D) memory tokens."""
    ids = torch.randint(3, model.config.vocab_size, (prompt_len,), generator=gen)
    ids[0], ids[prompt_len // 3] = 1, IMAGE_TOKEN_INDEX
    return ids, torch.randn(memory_len, model.config.mm_hidden_size, generator=gen)


# (prompt tokens, memory tokens, max new tokens): different lengths everywhere
SHAPES = [(20, 30, 12), (7, 81, 5), (33, 64, 20), (12, 10, 9), (25, 50, 15), (9, 3, 1)]


def _questions(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(*_question(gen, model, p, m), n) for p, m, n in SHAPES]


def _run(decoder, requests, joins):
    """Add requests[i] before step joins[i] (several may join at one step), then step until idle."""
    steps = 0
    while not decoder.idle or any(j >= steps for j in joins):
        for request, join in zip(requests, joins):
            if join == steps:
                decoder.add(request)
        decoder.step()
        assert decoder.running <= decoder.max_slots
        steps += 1
    return steps


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2, "attention_bias": True}],
                         ids=["mha", "gqa_bias"])
def test_answers_joining_at_different_steps_equal_lone_answers(overrides):
    model = tiny_vstream_model(0, **overrides)
    items = _questions(model)
    expected = [reference(model, ids, memory, n, None)[0].tolist() for ids, memory, n in items]
    # 3 slots for 6 questions: later ones wait for a freed slot; joiners arrive while others decode
    decoder = BatchDecoder(model, max_slots=3, max_len=256)
    requests = [BatchRequest(decoder.embed(ids, memory, name=f"q{i}"), n, name=f"q{i}")
                for i, (ids, memory, n) in enumerate(items)]
    _run(decoder, requests, joins=[0, 2, 2, 3, 5, 5])
    assert [r.tokens for r in requests] == expected
    assert [r.finish_reason for r in requests] == ["length"] * len(items)
    assert decoder.idle and sorted(decoder._free) == [0, 1, 2]


def test_eos_ends_an_answer_and_frees_its_slot(model):
    items = _questions(model, seed=3)
    # an EOS that the answers hit: the most common token of the lone answers
    lone = [reference(model, ids, memory, 20, None)[0].tolist() for ids, memory, _ in items]
    eos = max(set(sum(lone, [])), key=lambda t: sum(a.count(t) for a in lone))
    expected = [reference(model, ids, memory, 20, eos)[0].tolist() for ids, memory, _ in items]
    model.generation_config.eos_token_id = EOS
    decoder = BatchDecoder(model, max_slots=2, max_len=256)
    requests = [BatchRequest(decoder.embed(ids, memory), 20, eos_token_id=eos) for ids, memory, _ in items]
    _run(decoder, requests, joins=[0] * len(items))
    assert [r.tokens for r in requests] == expected
    assert any(r.finish_reason == "eos" for r in requests)
    assert all((r.finish_reason == "eos") == (r.tokens[-1] == eos) for r in requests)


def test_a_request_that_stops_leaves_the_others_intact(model):
    items = _questions(model, seed=4)[:4]
    expected = [reference(model, ids, memory, 12, None)[0].tolist() for ids, memory, _ in items]
    decoder = BatchDecoder(model, max_slots=4, max_len=256)
    gone = {"now": False}
    requests = [BatchRequest(decoder.embed(ids, memory), 12) for ids, memory, _ in items]
    requests[1].should_stop = lambda: gone["now"]  # the client of question 1 goes away

    def on_tokens(tokens):
        gone["now"] = len(requests[1].tokens) >= 3
    requests[1].on_tokens = on_tokens
    stopper = requests[2]  # question 2 reports a stop (a stop string) after its 5th token
    stopper.on_tokens = lambda tokens: len(stopper.tokens) == 5
    _run(decoder, requests, joins=[0, 0, 1, 1])
    assert requests[1].finish_reason == "cancelled" and requests[1].tokens == expected[1][:3]
    assert stopper.finish_reason == "stop" and stopper.tokens == expected[2][:5]
    assert [requests[i].tokens for i in (0, 3)] == [expected[0], expected[3]]


def test_a_bad_request_fails_alone_with_its_name(model):
    items = _questions(model, seed=5)[:3]
    expected = [reference(model, ids, memory, 6, None)[0].tolist() for ids, memory, _ in items]
    decoder = BatchDecoder(model, max_slots=4, max_len=128)
    ids, memory, _ = items[0]
    with pytest.raises(ValueError, match=r"question 7: memory tokens must be \(N >= 1, 32\)"):
        decoder.embed(ids, torch.randn(10, 16), name="question 7")
    with pytest.raises(ValueError, match="question 8: the prompt holds 0 <image>"):
        decoder.embed(torch.tensor([1, 5, 6]), memory, name="question 8")
    with pytest.raises(ValueError, match="question 9: a prompt of .* do not fit a slot of 127 positions"):
        decoder.add(BatchRequest(decoder.embed(ids, memory), 100, name="question 9"))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        BatchRequest(decoder.embed(ids, memory), 0)
    requests = [BatchRequest(decoder.embed(ids, memory), 6, name=f"q{i}") for i, (ids, memory, _) in enumerate(items)]

    def broken(tokens):
        if len(requests[1].tokens) == 2:
            raise RuntimeError("the client's callback broke")
    requests[1].on_tokens = broken
    _run(decoder, requests, joins=[0, 0, 0])
    assert requests[1].finish_reason == "error" and "callback broke" in str(requests[1].error)
    assert [requests[i].tokens for i in (0, 2)] == [expected[0], expected[2]]
    assert decoder.idle and len(decoder._free) == 4


def test_the_prefill_budget_spreads_joiners_over_steps(model):
    items = _questions(model, seed=6)[:4]
    expected = [reference(model, ids, memory, 4, None)[0].tolist() for ids, memory, _ in items]
    decoder = BatchDecoder(model, max_slots=4, max_len=256, max_prefill_tokens=120)
    requests = [decoder.add(BatchRequest(decoder.embed(ids, memory), 4)) for ids, memory, _ in items]
    decoder.step()
    assert 1 <= decoder.running < 4 and decoder.waiting  # not everyone fit the first step's prefill
    _run(decoder, [], [])
    assert [r.tokens for r in requests] == expected


def test_sampled_rows_beside_greedy_rows(model):
    items = _questions(model, seed=7)[:3]
    expected = [reference(model, ids, memory, 8, None)[0].tolist() for ids, memory, _ in items]

    def answers(seed):
        decoder = BatchDecoder(model, max_slots=3, max_len=256, seed=seed)
        requests = [decoder.add(BatchRequest(decoder.embed(ids, memory), 8, temperature=t, top_p=p))
                    for (ids, memory, _), t, p in zip(items, (0.0, 1.5, 1.0), (None, None, 1e-6))]
        _run(decoder, [], [])
        return [r.tokens for r in requests]

    first, again, other = answers(0), answers(0), answers(1)
    assert first[0] == expected[0]  # the greedy row is untouched by its sampled neighbours
    assert first[2] == expected[2]  # top_p that keeps one token samples the argmax
    assert first == again  # seeded
    assert first[1] != other[1] and all(0 <= t < model.config.vocab_size for t in first[1])


def test_kv_bytes_per_slot_sizes_the_cache(model):
    decoder = BatchDecoder(model, max_slots=3, max_len=200)
    assert decoder.max_len == 256
    assert decoder.kv_bytes == 3 * kv_bytes_per_slot(model.config, 200, torch.float32)

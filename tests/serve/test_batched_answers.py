"""The engine's answer lane with continuous batching: questions of different sessions answered together give
the answers of lone sessions; one that goes away or is bad leaves the others intact."""

import dataclasses
import threading
import time

import pytest
import torch

from flash_vstream.model.builder import load_pretrained_model
from flash_vstream.serve.engine import Engine
from flash_vstream.serve.session import StreamSession

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    tokenizer, model, _, _ = load_pretrained_model(tiny_model_dir, device="cpu")
    return tokenizer, model


def _session(loaded, frames, seed, **kwargs):
    """A session whose memory holds `frames` random CLIP-width frames (different counts: different memory sizes)."""
    tokenizer, model = loaded
    session = StreamSession(model, tokenizer, None, max_new_tokens=24, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    session.add_features(torch.randn(frames, 256, model.config.mm_hidden_size, generator=gen))
    return session


# (frames in memory, question, max_tokens) of each session
CASES = [(1, "what is in the video?", 12), (3, "describe the video.", 20), (7, "what happened first?", 6),
         (2, "is there a circle?", 16)]


def _lone(loaded, cases, **kwargs):
    """Each question answered by a lone session of its own (model.generate on the CPU)."""
    out = []
    for i, (frames, question, max_tokens) in enumerate(cases):
        answer = _session(loaded, frames, seed=i, **kwargs).ask(question, max_new_tokens=max_tokens)
        out.append((answer.text, answer.new_tokens))
    return out


@pytest.fixture
def engine():
    engines = []

    def make(loaded, cases, lone_fast_path=None, **kwargs):
        engine = Engine(answer_lane=True, keep_running=True, on_error="session", max_batch=3,
                        lone_fast_path=lone_fast_path)
        streams = [engine.add_session(f"s{i}", _session(loaded, frames, seed=i, **kwargs))
                   for i, (frames, _, _) in enumerate(cases)]
        if lone_fast_path:
            engine.warm_up_answers(streams[0].session)  # builds the engine's lone fast path, then the batch
        engines.append(engine.start())
        return engine, streams

    yield make
    for e in engines:
        e.stop()
        assert e.join() == []


def _chain(engine, streams, cases, after_pieces=2, **overrides):
    """Ask question i+1 once question i has streamed `after_pieces` pieces: they join the batch at
    different steps while the earlier ones decode. Returns the jobs and the most answers seen running at once."""
    jobs, peak = [None] * len(cases), [0]

    def ask(i):
        pieces = [0]

        def on_text(piece):
            pieces[0] += 1
            peak[0] = max(peak[0], engine._batch.running if engine._batch is not None else 1)
            if pieces[0] == after_pieces and i + 1 < len(cases):
                ask(i + 1)
        frames, question, max_tokens = cases[i]
        jobs[i] = engine.ask(streams[i], question, max_tokens=max_tokens, on_text=on_text, **overrides.get(i, {}))

    ask(0)
    for i in range(len(cases)):
        while jobs[i] is None:
            threading.Event().wait(0.01)
        jobs[i].future.exception(TIMEOUT_S)
    return jobs, peak[0]


def test_questions_of_different_sessions_in_one_batch_equal_lone_answers(loaded, engine):
    expected = _lone(loaded, CASES)
    assert sum(n for _, n in expected) > 2 * len(CASES)  # real answers, not an EOS at once
    engine, streams = engine(loaded, CASES)
    jobs, peak = _chain(engine, streams, CASES)
    got = [(job.future.result().answer.text, job.future.result().answer.new_tokens) for job in jobs]
    assert got == expected
    assert peak >= 2 and engine._batch.steps > 0  # they did share steps
    # 4 questions, 3 slots: the 4th waited for a freed slot; every slot is free again
    assert engine._batch.idle and sorted(engine._batch._free) == [0, 1, 2]


def test_a_lone_question_keeps_the_fast_path_and_moves_into_the_batch_when_another_comes(loaded, engine):
    cases = CASES[:2]
    expected = _lone(loaded, cases)
    engine, streams = engine(loaded, cases, fast=True)  # the fast path's decoder, eager on the CPU
    jobs, peak = _chain(engine, streams, cases, after_pieces=1)
    assert [(j.future.result().answer.text, j.future.result().answer.new_tokens) for j in jobs] == expected
    first = streams[0].session
    assert first._decoder is not None and first._decoder._generated >= 1  # it began on the fast path
    assert peak == 2  # then both ran in the batch

    # alone with nothing else waiting: answered on the fast path to the end, the batch untouched
    steps = engine._batch.steps
    job = engine.ask(streams[1], cases[1][1], max_tokens=cases[1][2])
    assert (job.future.result(TIMEOUT_S).answer.text, job.future.result().answer.new_tokens) == expected[1]
    assert engine._batch.steps == steps


def test_a_client_that_goes_away_leaves_the_others_intact(loaded, engine):
    expected = _lone(loaded, CASES[:3])
    engine, streams = engine(loaded, CASES[:3])
    gone = threading.Event()
    jobs = []

    def leave_after_two(piece, pieces=[]):
        pieces.append(piece)
        if len(pieces) == 2:
            jobs[1].cancelled.set()  # the client of question 1 went away mid-answer
            gone.set()
    for i, (_, question, max_tokens) in enumerate(CASES[:3]):
        jobs.append(engine.ask(streams[i], question, max_tokens=max_tokens,
                               on_text=leave_after_two if i == 1 else None))
    results = [job.future.result(TIMEOUT_S) for job in jobs]
    assert gone.is_set() and results[1].cancelled
    assert results[1].answer.new_tokens < expected[1][1]
    assert expected[1][0].startswith(results[1].answer.text)
    assert [(r.answer.text, r.answer.new_tokens) for r in (results[0], results[2])] == [expected[0], expected[2]]
    assert not results[0].cancelled and not results[2].cancelled


def test_a_bad_question_fails_alone_with_a_clear_error(loaded, engine):
    expected = _lone(loaded, CASES[:3])
    engine, streams = engine(loaded, CASES[:3])
    good = streams[1].session.snapshot()
    broken = dataclasses.replace(good, tokens=torch.randn(5, 7))  # memory of the wrong width
    jobs = [engine.ask(streams[0], CASES[0][1], max_tokens=CASES[0][2]),
            engine.ask(streams[1], "what is wrong here?", snapshot=broken),
            engine.ask(streams[2], CASES[2][1], max_tokens=CASES[2][2])]
    with pytest.raises(ValueError, match=r"question 'what is wrong here\?': memory tokens must be \(N >= 1, 32\), "
                                         r"got \(5, 7\)"):
        jobs[1].future.result(TIMEOUT_S)
    got = [(j.future.result(TIMEOUT_S).answer.text, j.future.result().answer.new_tokens) for j in (jobs[0], jobs[2])]
    assert got == [expected[0], expected[2]]
    # the session of the bad question answers its next question
    job = engine.ask(streams[1], CASES[1][1], max_tokens=CASES[1][2])
    assert (job.future.result(TIMEOUT_S).answer.text, job.future.result().answer.new_tokens) == expected[1]


def _wait_for(condition, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        threading.Event().wait(0.01)


def test_the_engines_lone_fast_path_keeps_the_prefix_of_the_one_session(loaded, engine):
    """A session without a fast path (the server's) answering alone: on the engine's own fast-path decoder,
    whose memory prefix the idle lane keeps on the newest snapshot while one session runs."""
    cases = CASES[:1]
    expected = _lone(loaded, cases)
    engine, streams = engine(loaded, cases, lone_fast_path=True)
    session = streams[0].session
    _wait_for(lambda: engine._lone is not None and engine._lone.prefix_matches(session.prefix_ids(),
                                                                               session.snapshot().tokens))
    job = engine.ask(streams[0], cases[0][1], max_tokens=cases[0][2])
    assert (job.future.result(TIMEOUT_S).answer.text, job.future.result().answer.new_tokens) == expected[0]
    assert engine._batch.steps == 0 and engine._lone._generated >= 1  # the lone decoder answered
    session.add_features(torch.randn(2, 256, loaded[1].config.mm_hidden_size))  # a newer snapshot
    _wait_for(lambda: engine._lone.prefix_matches(session.prefix_ids(), session.snapshot().tokens))


def test_the_lone_fast_path_hands_over_to_the_batch(loaded, engine):
    cases = CASES[:2]
    expected = _lone(loaded, cases)
    engine, streams = engine(loaded, cases, lone_fast_path=True)
    jobs, peak = _chain(engine, streams, cases, after_pieces=1)
    assert [(j.future.result().answer.text, j.future.result().answer.new_tokens) for j in jobs] == expected
    assert engine._lone._generated >= 1 and peak == 2  # began on the lone decoder, ended batched
    # two sessions run: the idle lane keeps no prefix on a newer snapshot (it would thrash between them)
    session = streams[0].session
    session.add_features(torch.randn(1, 256, loaded[1].config.mm_hidden_size))
    threading.Event().wait(0.5)  # five of the lane's idle wake-ups
    assert not engine._lone.prefix_matches(session.prefix_ids(), session.snapshot().tokens)


def test_a_lone_joiners_padded_prefill_is_the_eager_prefill(loaded):
    """What a lone joiner's prefill graph captures (on CUDA), run eagerly here: its prompt padded up to a multiple
    of PREFILL_ALIGN gives the eager prefill's first token, cache and position (fp32, CPU)."""
    from flash_vstream.runtime.batch_decoder import PREFILL_ALIGN, BatchDecoder
    from flash_vstream.runtime.decoder import round_up

    session = _session(loaded, 3, seed=0)
    run = session.begin("describe the video.")
    out = []
    for padded in (False, True):
        decoder = BatchDecoder(loaded[1], max_slots=2, max_len=session.answer_len())
        request = decoder.add(session.batch_request(run, decoder))
        assert decoder._admit() == [request]
        if padded:
            width = round_up(request.prompt_len, PREFILL_ALIGN)
            assert width > request.prompt_len  # real padding
            token = decoder._replay_prefill(request, decoder._prefill_graph(width, capture=False))
        else:
            token = decoder._prefill([request])
        length = request.prompt_len
        out.append((token, [k[request.slot, :, :length] for k in decoder.keys + decoder.values],
                    int(decoder._pos[request.slot]), decoder._length[request.slot], int(decoder._ids[request.slot])))
    (eager_token, eager_kv, *eager_rest), (padded_token, padded_kv, *padded_rest) = out
    assert torch.equal(eager_token, padded_token) and eager_rest == padded_rest
    for a, b in zip(eager_kv, padded_kv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

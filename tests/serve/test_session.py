"""The synchronous realtime core: frames -> STAR memory snapshots -> answers, deterministically."""

import threading

import pytest
import torch

from flash_vstream.conversation import conv_templates
from flash_vstream.mm_utils import process_images, tokenizer_image_token
from flash_vstream.model.builder import load_pretrained_model
from flash_vstream.model.memory import STARMemory
from flash_vstream.serve.memory_plot import memory_record, plot_memory_timeline
from flash_vstream.serve.session import QuestionSchedule, StreamSession, state_nbytes
from flash_vstream.video_io import iter_frames

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    tokenizer, model, image_processor, context_len = load_pretrained_model(tiny_model_dir, device="cpu")
    return tokenizer, model, image_processor


@pytest.fixture(scope="module")
def stream(example_mp4):
    """The first 8 one-per-second frames of example.mp4 with their timestamps."""
    frames = []
    for frame, t in iter_frames(example_mp4, fps=1.0):
        frames.append((frame, t))
        if len(frames) == 8:
            break
    return frames


def _session(loaded, **kwargs):
    tokenizer, model, image_processor = loaded
    return StreamSession(model, tokenizer, image_processor, max_new_tokens=MAX_NEW_TOKENS, **kwargs)


def _offline_memory(loaded, frames):
    """A STARMemory fed the same frames offline, one frame per update."""
    _, model, image_processor = loaded
    memory = STARMemory(model.config, attention_model=model.get_model().attention_model, seed=0)
    with torch.inference_mode():
        for frame, t in frames:
            pixels = process_images([frame], image_processor, model.config.image_aspect_ratio)  # (1, 3, S, S)
            memory.update(model.get_vision_tower()(pixels), [t])  # (1, 256, D)
    return memory


def _reference_answer(loaded, tokens, question):
    """model.generate on the given memory tokens, greedy, with the vicuna_v1 prompt."""
    tokenizer, model, _ = loaded
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    out = model.generate(ids, memory=[tokens], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_scripted_timeline_answers_from_the_expected_memory_versions(loaded, stream):
    session = _session(loaded)
    assert session.snapshot() is None
    for frame, t in stream[:5]:
        session.add_frame(frame, t)
    first = session.snapshot()
    first_tokens = first.tokens.clone()
    a1 = session.ask("what is in the video?")
    for frame, t in stream[5:]:
        session.add_frame(frame, t)
    second = session.snapshot()
    a2 = session.ask("describe the video.")

    assert (a1.frames_seen, a2.frames_seen) == (5, 8)
    assert (first.stream_time, second.stream_time) == (stream[4][1], stream[7][1])
    offline5, offline8 = _offline_memory(loaded, stream[:5]), _offline_memory(loaded, stream)
    assert torch.equal(first.tokens, offline5.read())
    assert torch.equal(second.tokens, offline8.read())
    assert a1.memory_tokens == offline5.num_tokens and a2.memory_tokens == offline8.num_tokens == second.num_tokens
    assert first.timestamps == offline5.timestamps() and second.timestamps == offline8.timestamps()
    assert second.temporal_weights == offline8.temporal_weights()
    assert torch.equal(first.tokens, first_tokens)  # a published snapshot never changes
    assert a1.text == _reference_answer(loaded, offline5.read(), "what is in the video?")
    assert a2.text == _reference_answer(loaded, offline8.read(), "describe the video.")
    # the old snapshot still answers as it did, whatever the memory has become since
    assert session.ask("what is in the video?", snapshot=first).text == a1.text
    assert a1.ttft_s is not None and 0 < a1.ttft_s <= a1.answer_s


def test_run_timeline_asks_each_question_when_the_stream_reaches_it(loaded, stream):
    questions = [{"time": 100, "question": "describe the video.", "id": "late"},
                 {"time": 4.5, "question": "what is in the video?", "id": "early"},
                 {"time": 5.0, "question": "what is in the video?"}]
    seen = []
    records = _session(loaded).run_timeline(stream, questions, on_answer=lambda r, s: seen.append(s.frames_seen))
    assert [r.get("id") for r in records] == ["early", None, "late"]
    assert [r["frames_seen"] for r in records] == [5, 6, 8]  # 4.5: frames 0..4; 5.0: frame 5 counts; 100: the end
    assert [r["time"] for r in records] == [4.5, 5.0, 100.0]
    assert seen == [5, 6, 8]
    for r in records:
        assert set(r) >= {"time", "question", "answer", "frames_seen", "memory_tokens", "latency_s", "ttft_s"}
    direct = _session(loaded)
    for frame, t in stream[:5]:
        direct.add_frame(frame, t)
    assert records[0]["answer"] == direct.ask("what is in the video?").text
    assert records[0]["memory_tokens"] == direct.snapshot().num_tokens


def test_precomputed_features_give_the_same_memory_as_frames(loaded, stream):
    _, model, _ = loaded
    by_frame = _session(loaded)
    for frame, t in stream:
        by_frame.add_frame(frame, t)
    by_features = _session(loaded)
    features = torch.cat([by_features.encode([f]) for f, _ in stream])  # (8, 256, D)
    snapshot = by_features.add_features(features, [t for _, t in stream])
    assert snapshot.frames_seen == 8
    assert torch.equal(snapshot.tokens, by_frame.snapshot().tokens)
    # default timestamps: frame counter / video_fps
    counted = _session(loaded).add_features(features[:3])
    assert counted.stream_time == 2.0 and counted.timestamps["spatial"] == [2.0]


def test_streamed_pieces_make_the_answer_and_stop_flag_ends_early(loaded, stream):
    session = _session(loaded)
    for frame, t in stream[:3]:
        session.add_frame(frame, t)
    pieces = []
    answer = session.ask("what is in the video?", on_text=pieces.append)
    assert "".join(pieces).strip() == answer.text
    assert answer.new_tokens == MAX_NEW_TOKENS  # a random tiny model never says EOS this early
    stopped = session.ask("what is in the video?", should_stop=lambda: True)
    assert stopped.new_tokens == 1


def test_fresh_and_continuing_conversations(loaded, stream):
    fresh = _session(loaded)
    cont = _session(loaded, conversation="continue")
    for s in (fresh, cont):
        for frame, t in stream[:2]:
            s.add_frame(frame, t)
    first = cont.ask("what is in the video?")
    fresh.ask("what is in the video?")
    prompt = cont.prompt("and then?")
    assert prompt.count("<image>") == 1 and prompt.index("<image>") < prompt.index("what is in the video?")
    assert f"ASSISTANT: {first.text}</s>USER: and then? ASSISTANT:" in prompt
    assert "what is in the video?" not in fresh.prompt("and then?")
    cont.reset_conversation()
    assert cont.prompt("x") == fresh.prompt("x")
    # the history is dropped, oldest first, rather than overflowing the context
    tight = _session(loaded, conversation="continue", context_len=cont.snapshot().num_tokens + MAX_NEW_TOKENS + 60)
    tight.add_frame(*stream[0])
    for _ in range(4):
        tight.ask("what is in the video now?")
    assert tight.ask("what is in the video?").memory_tokens == tight.snapshot().num_tokens


@pytest.mark.parametrize("conversation", ["fresh", "continue"])
def test_fast_path_gives_the_stock_answers(loaded, stream, conversation):
    """FastVisionEncoder + GreedyDecoder with the prefix kept in the cache (what runs on CUDA), forced on
    here: the same features, snapshots, answer texts and token counts as the stock path."""
    stock = _session(loaded, conversation=conversation)
    fast = _session(loaded, conversation=conversation, fast=True).warm_up()
    frames = [f for f, _ in stream[:3]]
    assert torch.equal(fast.encode(frames), stock.encode(frames))
    for frame, t in stream[:4]:
        stock.add_frame(frame, t)
        fast.add_frame(frame, t)
        # the ingest side ran the prompt prefix over the new memory
        assert fast._decoder.prefix_matches(fast.prefix_ids(), fast.snapshot().tokens)
    assert torch.equal(fast.snapshot().tokens, stock.snapshot().tokens)
    questions = ["what is in the video?", "describe the video.", "what is in the video?"]
    for q in questions:
        pieces = []
        a, b = stock.ask(q), fast.ask(q, on_text=pieces.append)
        assert (b.text, b.new_tokens, b.memory_tokens) == (a.text, a.new_tokens, a.memory_tokens)
        assert "".join(pieces).strip() == b.text
        assert b.ttft_s is not None and 0 < b.ttft_s <= b.answer_s
    # a frame published while an answer held the decoder: the question runs the prefix itself
    with fast._decoder_lock:
        fast.add_frame(*stream[4])
    stock.add_frame(*stream[4])
    assert not fast._decoder.prefix_matches(fast.prefix_ids(), fast.snapshot().tokens)
    assert fast.ask("describe the video.").text == stock.ask("describe the video.").text
    assert fast.ask("what?", should_stop=lambda: True).new_tokens == 1


def test_fast_path_falls_back_for_sampling(loaded, stream):
    sampled = _session(loaded, fast=True, temperature=0.7)
    sampled.add_frame(*stream[0])
    assert sampled._decoder is None  # no greedy decoder for a sampling session
    assert sampled.ask("what is in the video?").new_tokens >= 1


def test_snapshot_is_swapped_atomically_under_concurrent_ingest(loaded, stream):
    session = _session(loaded)
    session.add_frame(*stream[0])
    seen, done = [], threading.Event()

    def ingest():
        for frame, t in stream[1:]:
            session.add_frame(frame, t)
        done.set()

    thread = threading.Thread(target=ingest)
    thread.start()
    while not done.is_set():
        snap = session.snapshot()
        seen.append((snap.frames_seen, snap.stream_time, snap.num_tokens, snap.tokens.shape[0]))
    thread.join()
    for frames, stream_time, num, rows in seen:
        assert stream_time == stream[frames - 1][1] and num == rows
    assert [f for f, *_ in seen] == sorted(f for f, *_ in seen)


def test_question_schedule():
    schedule = QuestionSchedule([{"time": 3, "question": "c"}, {"time": 0.5, "question": "a"},
                                 {"time": 2.0, "question": "b1"}, {"time": 2.0, "question": "b2"}])
    assert schedule.due_before(0.0) == [] and schedule.due_at(0.0) == []
    assert [q["question"] for q in schedule.due_before(1.0)] == ["a"]
    assert schedule.due_at(1.0) == [] and schedule.due_before(2.0) == []
    assert [q["question"] for q in schedule.due_at(2.0)] == ["b1", "b2"]  # ties keep file order
    assert len(schedule) == 1
    assert [q["question"] for q in schedule.remaining()] == ["c"] and len(schedule) == 0
    for bad in ({"time": -1, "question": "x"}, {"time": "soon", "question": "x"}, {"question": "x"},
                {"time": 1}, {"time": 1, "question": " "}, {"time": float("nan"), "question": "x"}):
        with pytest.raises(ValueError):
            QuestionSchedule([bad])


def test_memory_state_stays_bounded_on_a_long_feature_stream(loaded):
    session = _session(loaded)
    dim = loaded[1].config.mm_hidden_size
    generator = torch.Generator().manual_seed(0)
    sizes = {}
    for step in range(160):  # the CLI test streams 3000 frames; here: past the fill-up of every memory
        snapshot = session.add_features(torch.randn(256, dim, generator=generator))
        if step + 1 in (40, 160):
            sizes[step + 1] = (state_nbytes(session.memory), snapshot.num_tokens)
    assert sizes[40] == sizes[160]
    assert sizes[160][1] == 681


def test_memory_plot_writes_a_png(loaded, stream, tmp_path):
    session = _session(loaded)
    records = []
    for i, (frame, t) in enumerate(stream):
        snapshot = session.add_frame(frame, t)
        if i in (2, 7):
            records.append(snapshot.plot_record(t, f"question at {t}"))
    records.append(memory_record(session.memory, 60.0, "a question after the end of the stream"))
    path = plot_memory_timeline(records, str(tmp_path / "plots" / "memory.png"), stream_end=stream[-1][1])
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_memory_timeline([], str(tmp_path / "empty.png"))


def test_check_fast_session_script_passes_on_cpu():
    """benchmarks/check_fast_session.py (the GPU check of the fast path) runs and agrees on the CPU."""
    import subprocess
    import sys

    from support import REPO

    result = subprocess.run([sys.executable, "-m", "benchmarks.check_fast_session", "--device", "cpu", "--frames", "6",
                             "--ask-every", "3"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count("answer equal True") == 2 and result.stdout.strip().endswith("OK")

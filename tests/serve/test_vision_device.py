"""`--vision-device`: CLIP and the STAR memory on one device, the LLM on another (runtime/devices.py).

On the CPU: the flag through the real CLI gives the default's answers, the placement (which part on which
device) is checked with the tower on the `meta` device, and bad device strings are clear errors. With two
CUDA devices (skipped otherwise; `python -m pytest -m gpu tests/serve/test_vision_device.py`): the split
session gives the one-device session's answers, stock and fast path, with its memory on the vision card."""

import io
import json

import pytest
import torch

from flash_vstream.model.builder import load_pretrained_model
from flash_vstream.runtime.devices import (Placement, check_pair, module_devices, parse_device, place_vision,
                                           vision_placement)
from flash_vstream.serve import cli_video_stream as cli
from flash_vstream.serve import server
from flash_vstream.serve.session import StreamSession
from flash_vstream.video_io import iter_frames

QUESTIONS = [{"time": 2.5, "question": "what is in the video?", "id": "a"},
             {"time": 100, "question": "describe the video.", "id": "b"}]


def _answers(path):
    with open(path) as f:
        return [{k: r[k] for k in ("id", "answer", "frames_seen", "memory_tokens", "stream_time")}
                for r in map(json.loads, f)]


def test_cli_vision_device_cpu_gives_the_default_answers(tiny_model_dir, example_mp4, tmp_path):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    runs = {}
    for name, extra in (("default", []), ("vision_cpu", ["--vision-device", "cpu"])):
        out, log = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.log"
        code = cli.main(["--model-path", tiny_model_dir, "--video-file", example_mp4, "--questions", str(qfile),
                         "--output", str(out), "--max-frames", "5", "--play_speed", "inf", "--device", "cpu",
                         "--max-new-tokens", "6", "--log-file", str(log), *extra], stdout=io.StringIO())
        assert code == 0
        runs[name] = _answers(out)
        start = json.loads(log.read_text().splitlines()[0])
        assert start["placement"] == {"llm": "cpu", "vision": "cpu", "split": False}
    assert [r["id"] for r in runs["default"]] == ["a", "b"]
    assert runs["vision_cpu"] == runs["default"]


def test_placement_with_the_tower_on_meta(tiny_model_dir):
    tokenizer, model, image_processor, _ = load_pretrained_model(tiny_model_dir, device="cpu")
    place_vision(model, "meta")  # shapes only: where each part sits, without memory
    assert module_devices(model) == {"vision_tower": "meta", "embed_tokens": "cpu", "layers": "cpu",
                                     "lm_head": "cpu", "mm_projector": "cpu", "attention_model": "cpu"}
    session = StreamSession(model, tokenizer, image_processor, fast=False)
    placement = session.placement
    assert (placement.llm, placement.vision, placement.split) == (torch.device("cpu"), torch.device("meta"), True)
    # the memory updates with a frozen copy of the Semantic Attention on the vision side; the model's own stays
    own = model.get_model().attention_model
    memory_attention = session.memory.attention_model
    assert memory_attention is not own
    assert {p.device.type for p in memory_attention.parameters()} == {"meta"}
    assert {p.device.type for p in own.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in memory_attention.parameters())
    assert [n for n, _ in memory_attention.named_parameters()] == [n for n, _ in own.named_parameters()]


def test_one_device_hands_the_same_tensor_over(tiny_model_dir):
    _, model, _, _ = load_pretrained_model(tiny_model_dir, device="cpu", vision_device="cpu")
    placement = Placement.of(model)
    assert not placement.split and module_devices(model)["vision_tower"] == "cpu"
    assert placement.memory_attention(model) is model.get_model().attention_model
    tokens = torch.randn(81, model.config.mm_hidden_size)
    assert placement.hand_over(tokens) is tokens  # nothing copied


@pytest.mark.parametrize("text, message", [
    ("gpu:1", "not a device"),
    ("cuda:x", "not a device"),
    ("meta", "only cpu and cuda"),
    ("cuda:64", "CUDA is not available" if not torch.cuda.is_available() else "CUDA device(s)"),
])
def test_bad_vision_device_is_a_clear_error(text, message, tiny_model_dir, example_mp4, capsys):
    with pytest.raises(ValueError, match="--vision-device") as error:
        parse_device(text)
    assert message in str(error.value)
    code = cli.main(["--model-path", tiny_model_dir, "--video-file", example_mp4, "--device", "cpu",
                     "--vision-device", text], stdin=io.StringIO(""), stdout=io.StringIO())
    assert code == 2
    err = capsys.readouterr().err
    assert "--vision-device" in err and message in err
    args = server.build_parser().parse_args(["--model-path", tiny_model_dir, "--vision-device", text])
    with pytest.raises(ValueError, match=message):
        server.settings_from_args(args)


def test_mixed_device_types_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="both sides must be CUDA devices or both the CPU"):
        check_pair("cpu", "meta")
    assert vision_placement("cuda", None) == ("cuda", None)  # no flag: nothing checked, nothing changed
    assert vision_placement("cpu", "cpu") == ("cpu", "cpu")
    with pytest.raises(ValueError, match="--device 'gpu'"):
        vision_placement("gpu", "cpu")
    assert server.settings_from_args(server.build_parser().parse_args(
        ["--model-path", tiny_model_dir, "--vision-device", "cpu"])).vision_device == "cpu"


# --- two CUDA devices --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("fast", [False, True])
def test_split_session_answers_as_one_device(tiny_model_dir, example_mp4, fast):
    frames = [item for item, _ in zip(iter_frames(example_mp4, fps=1.0), range(6))]
    records = {}
    for name, vision in (("one", None), ("split", "cuda:1")):
        tokenizer, model, image_processor, _ = load_pretrained_model(
            tiny_model_dir, device="cuda:0", vision_device=vision, torch_dtype=torch.float32)
        session = StreamSession(model, tokenizer, image_processor, max_new_tokens=6, fast=fast)
        assert session.placement.split == (vision is not None)
        records[name] = session.run_timeline(frames, QUESTIONS)
        snapshot = session.snapshot()
        assert snapshot.tokens.device == torch.device("cuda:0")  # answered on the LLM's card
        memory_device = session.memory.read().device
        assert memory_device == torch.device("cuda:1" if vision else "cuda:0")
        assert module_devices(model)["vision_tower"] == str(memory_device)
        if fast and vision:
            assert session.fast_path.describe()["vision"]["one_frame"] == "cuda_graph"  # captured on cuda:1
    for one, split in zip(records["one"], records["split"]):
        for key in ("answer", "frames_seen", "memory_tokens", "stream_time"):
            assert split[key] == one[key], key


@pytest.mark.slow  # ~20 s on a loaded CPU (two layouts, seven answers each); the default run imports the section
def test_realtime_benchmark_vision_split_section_runs(tmp_path):
    """`python -m benchmarks.realtime --vision-device D`: both layouts measured, busy and quiet (CPU smoke: the
    numbers mean nothing here; on two GPUs this is the split's measurement)."""
    from benchmarks.realtime.__main__ import main
    from benchmarks.realtime.sections import SECTIONS

    skip = ",".join(s for s in SECTIONS if s != "vision_split")
    assert main(["--output-dir", str(tmp_path), "--preset", "tiny", "--device", "cpu", "--vision-device", "cpu",
                 "--skip", skip, "--window", "2"]) == 0
    section = json.loads((tmp_path / "bench.json").read_text())["sections"]["vision_split"]
    assert section["status"] == "ok" and section["vision_device"] == "cpu"
    for name in ("one_device", "split"):
        layout = section["layouts"][name]
        assert layout["memory_tokens"] == 681 and layout["frames_seen"] >= 20
        assert layout["busy"]["answers"] == 2 and layout["busy"]["frames"] >= 1
        assert layout["quiet"]["ingest_ms"]["n"] == 2 and layout["busy"]["ttft_ms"]["p99"] > 0
    assert set(section["split_over_one_device"]) == {"busy_ingest_p99", "busy_ttft_p50", "busy_ttft_p99",
                                                     "busy_frames_per_answer"}

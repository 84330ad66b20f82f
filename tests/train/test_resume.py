"""Resume that loses nothing: a stage-1 run killed with SIGKILL between checkpoints, in the middle
of writing one, or restarted over a half-written `checkpoint-*` folder, and then restarted with
`--resume_from_checkpoint auto`, ends with the same weights (torch.equal) and the same per-step
loss log as an uninterrupted run (CPU, fp32, tiny model).

Each run is its own process, forked by a "zygote" (this file run as `python test_resume.py`) that
has imported the training code once, so a run starts in milliseconds rather than the seconds the
imports take. A run to be killed blocks at a known point (`BlockAt`) and says so through a signal
file; the test then sends it SIGKILL.
"""

import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch

from flash_vstream.train.checkpointing import (MARKER, STAGING, CheckpointWriteCallback, checkpoint_folders,
                                               resolve_auto, rotate, seal, staged_outputs, why_incomplete)

MAX_STEPS, SAVE_STEPS = 8, 3  # 10 records, batch 2: 5 steps an epoch; checkpoints 3, 6 (epoch 1), 8


class BlockAt(CheckpointWriteCallback):
    """Blocks the run at step `step`, writes the signal file and waits to be killed: `where="step"`
    right after that step's update (between checkpoints), `where="save"` inside that step's save,
    `where="end"` when training has ended (last checkpoint written, final outputs not yet)."""

    def __init__(self, step, where, signal_file):
        self.step, self.where, self.signal_file = step, where, signal_file

    def _block(self, state):
        if state.global_step == self.step:
            with open(self.signal_file, "w") as f:
                f.write(str(os.getpid()))
            while True:
                time.sleep(60)

    def on_step_end(self, args, state, control, **kwargs):
        if self.where == "step":
            self._block(state)

    def on_checkpoint_writing(self, args, state, control, folder, **kwargs):
        if self.where == "save":
            self._block(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.where == "end":
            self._block(state)


def _run_child(request):
    """One run in a forked process: stdout and stderr to the log, the log history to output_dir."""
    from flash_vstream.train.train import train

    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        block = request.get("block")
        trainer = train(request["flags"], callbacks=[BlockAt(**block)] if block else None)
        with open(os.path.join(trainer.args.output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _zygote():
    """Import once, then per request line (JSON) fork a run; answer its pid, then its exit code."""
    import flash_vstream.train.train  # noqa: F401  (no tensor op has run: forking is safe)

    print("ready", flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            _run_child(json.loads(line))
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


class Zygote:
    """The tests' handle on the zygote process: `run` starts one training run and waits for its end
    (or for it to block, then kills it)."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self._answer(120) == "ready"

    def _answer(self, timeout):
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"no answer from the zygote in {timeout} s"
        return self.process.stdout.readline().strip()

    def run(self, flags, log, block_at=None, where=None, timeout=300):
        """Run to the end, or (block_at) until the run blocks there, then SIGKILL it. Returns the log."""
        signal_file = f"{log}.signal"
        request = {"flags": flags, "log": str(log)}
        if block_at is not None:
            request["block"] = {"step": block_at, "where": where, "signal_file": signal_file}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = int(self._answer(30))
        if block_at is not None:
            deadline = time.monotonic() + timeout
            while not os.path.exists(signal_file) and time.monotonic() < deadline:
                ready, _, _ = select.select([self.process.stdout], [], [], 0.05)
                assert not ready, f"the run ended before blocking at step {block_at}:\n{open(log).read()[-3000:]}"
            os.kill(pid, signal.SIGKILL)
        code = int(self._answer(timeout))
        output = open(log).read()
        assert code == (-signal.SIGKILL if block_at is not None else 0), output[-3000:]
        return output

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def runs():
    zygote = Zygote()
    yield zygote
    zygote.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer_dir, tiny_clip_dir):
    """A tiny LLM, features of two images and two videos (CLIP width 32) and 10 records."""
    from flash_vstream.demo.tiny import build_tiny_llama
    from flash_vstream.features import save_features

    root = tmp_path_factory.mktemp("resume")
    build_tiny_llama(str(root / "llm"), tiny_tokenizer_dir, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    gen = torch.Generator().manual_seed(0)
    records = []
    for name in ("red", "blue"):
        save_features(str(root / "features" / f"{name}.safetensors"), torch.randn(12, 256, 32, generator=gen), {"fps": 1})
        save_features(str(root / "features" / f"{name}_image.safetensors"), torch.randn(256, 32, generator=gen), {})
        for kind, rel in (("video", f"{name}.mp4"), ("image", f"{name}_image.png")):
            records.append({"id": f"{kind}-{name}", kind: rel, "conversations": [
                {"from": "human", "value": "what colour is the background? <image>"}, {"from": "gpt", "value": name}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "say yes"},
                                                    {"from": "gpt", "value": "yes"}]})
    (root / "data.json").write_text(json.dumps(records * 2))
    return root


def _flags(workdir, out, clip):
    return ["--model_name_or_path", str(workdir / "llm"), "--vision_tower", clip, "--version", "plain",
            "--tune_mm_mlp_adapter", "True", "--data_path", str(workdir / "data.json"), "--use_features", "True",
            "--image_folder", str(workdir / "features"), "--video_folder", str(workdir / "features"),
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
            "--lr_scheduler_type", "cosine", "--warmup_steps", "2", "--max_steps", str(MAX_STEPS),
            "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS), "--logging_steps", "1",
            "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "0",
            "--group_by_modality_length", "True", "--video_long_memory_length", "4",
            "--video_Turing_memory_length", "4", "--resume_from_checkpoint", "auto", "--disable_tqdm", "True"]


def _losses(out):
    """The per-step log: step, loss, grad norm, learning rate, epoch."""
    history = json.loads((out / "log_history.json").read_text())
    return [h for h in history if "loss" in h]


def _assert_same_run(out, reference):
    adapter = torch.load(out / "mm_projector.bin", weights_only=True)
    expected = torch.load(reference / "mm_projector.bin", weights_only=True)
    assert adapter.keys() == expected.keys()
    assert all(torch.equal(adapter[k], expected[k]) for k in expected), "the weights differ"
    assert _losses(out) == _losses(reference)
    assert [h["step"] for h in _losses(out)] == list(range(1, MAX_STEPS + 1))
    assert not (out / STAGING).exists()


@pytest.fixture(scope="module")
def reference(workdir, tiny_clip_dir, runs):
    """The uninterrupted run."""
    out = workdir / "reference"
    runs.run(_flags(workdir, out, tiny_clip_dir), workdir / "reference.log")
    return out


def test_uninterrupted_run_leaves_sealed_checkpoints(reference):
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    for step in (3, 6, 8):
        marker = json.loads((reference / f"checkpoint-{step}" / MARKER).read_text())
        assert marker["global_step"] == step
        assert {"trainer_state.json", "optimizer.pt", "rng_state.pth", "mm_projector.bin"} <= set(marker["files"])
    assert not (reference / STAGING).exists()
    losses = [h["loss"] for h in _losses(reference)]
    assert len(losses) == MAX_STEPS and len(set(losses)) > 1


def test_kill_between_checkpoints_then_auto_resume(workdir, tiny_clip_dir, reference, runs, tmp_path):
    out = tmp_path / "run"
    flags = _flags(workdir, out, tiny_clip_dir)
    runs.run(flags, tmp_path / "killed.log", block_at=7, where="step")  # after checkpoint-6 (epoch 1), before 8
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not (out / "mm_projector.bin").exists()
    stamp = (out / "checkpoint-6" / MARKER).stat().st_mtime_ns
    runs.run(flags, tmp_path / "resumed.log")
    assert (out / "checkpoint-6" / MARKER).stat().st_mtime_ns == stamp  # resumed from it, not rerun
    _assert_same_run(out, reference)


def test_kill_between_checkpoints_with_the_default_sampler_and_workers(workdir, tiny_clip_dir, runs, tmp_path):
    """Without --group_by_modality_length the Trainer's seeded random sampler gives the order, and the
    samples come from data-loader worker processes (as the training scripts run)."""
    variant = ["--group_by_modality_length", "False", "--dataloader_num_workers", "2"]
    reference = tmp_path / "reference"
    runs.run(_flags(workdir, reference, tiny_clip_dir) + variant, tmp_path / "reference.log")
    out = tmp_path / "run"
    flags = _flags(workdir, out, tiny_clip_dir) + variant
    runs.run(flags, tmp_path / "killed.log", block_at=7, where="step")
    runs.run(flags, tmp_path / "resumed.log")
    _assert_same_run(out, reference)


def test_kill_while_a_checkpoint_is_written_then_auto_resume(workdir, tiny_clip_dir, reference, runs, tmp_path):
    out = tmp_path / "run"
    flags = _flags(workdir, out, tiny_clip_dir)
    runs.run(flags, tmp_path / "killed.log", block_at=6, where="save")
    # The kill landed inside the save of step 6: its files are staged, not in place, and not sealed.
    staged = out / STAGING / "checkpoint-6"
    assert (staged / "optimizer.pt").exists() and not (staged / MARKER).exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    log = runs.run(flags, tmp_path / "resumed.log")
    assert "killed saves left (checkpoint-6)" in log
    _assert_same_run(out, reference)
    assert (out / "checkpoint-6" / MARKER).exists()


def test_half_written_checkpoint_folder_is_skipped_and_removed(workdir, tiny_clip_dir, reference, runs, tmp_path):
    """What a kill during a save left before this change: `checkpoint-6` with its weights and no state.
    `auto` used to pick it, and every restart failed with "Can't find a valid checkpoint"."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
    half = out / "checkpoint-6"
    half.mkdir()
    shutil.copy(reference / "checkpoint-6" / "config.json", half / "config.json")
    (half / "model.safetensors").write_bytes((reference / "checkpoint-6" / "model.safetensors").read_bytes()[:1000])
    log = runs.run(_flags(workdir, out, tiny_clip_dir), tmp_path / "resumed.log")
    assert f"{half} is an incomplete checkpoint (no completion marker): skipped, removed" in log
    _assert_same_run(out, reference)
    assert (out / "checkpoint-6" / MARKER).exists()  # written again by the resumed run


def test_kill_before_the_final_outputs_then_auto_resume(workdir, tiny_clip_dir, reference, runs, tmp_path):
    """Killed after the last checkpoint, before the outputs: the restart trains no step again."""
    out = tmp_path / "run"
    flags = _flags(workdir, out, tiny_clip_dir)
    runs.run(flags, tmp_path / "killed.log", block_at=MAX_STEPS, where="end")
    assert (out / f"checkpoint-{MAX_STEPS}" / MARKER).exists() and not (out / "mm_projector.bin").exists()
    runs.run(flags, tmp_path / "resumed.log")
    _assert_same_run(out, reference)
    assert json.loads((out / "config.json").read_text())["model_type"] == "vstream"


# --- stage 2 with the optimizer inside the backward pass (--optim_in_backward) ---------------------------------------
def _stage2_flags(workdir, out, clip, *extra):
    """Stage 2 (every LLM weight trains) without gradient clipping, so torch's AdamW can be the reference."""
    flags = _flags(workdir, out, clip)
    flags[flags.index("plain")] = "v1"
    flags.remove("--tune_mm_mlp_adapter")
    flags.remove("True")  # the value of --tune_mm_mlp_adapter, the first "True" in the list
    return flags + ["--learning_rate", "2e-3", "--max_grad_norm", "0", *extra]


def _full_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def in_backward_reference(workdir, tiny_clip_dir, runs):
    out = workdir / "in-backward"
    runs.run(_stage2_flags(workdir, out, tiny_clip_dir, "--optim_in_backward", "True"), workdir / "in-backward.log")
    return out


def test_optimizer_in_backward_trains_as_torch_adamw(workdir, tiny_clip_dir, in_backward_reference, runs, tmp_path):
    """The same weights (torch.equal) and losses as the Trainer's fused torch AdamW (the same kernel, one parameter
    at a time), with the warmup and cosine schedule applied to every parameter; no gradient survives a step."""
    out = tmp_path / "fused-adamw"
    runs.run(_stage2_flags(workdir, out, tiny_clip_dir, "--optim", "adamw_torch_fused"), tmp_path / "fused.log")
    ours, expected = _full_weights(in_backward_reference), _full_weights(out)
    assert ours.keys() == expected.keys() and any(k.startswith("model.layers.") for k in ours)
    assert all(torch.equal(ours[k], expected[k]) for k in expected), "the weights differ"
    losses = _losses(in_backward_reference)
    assert [h["loss"] for h in losses] == [h["loss"] for h in _losses(out)]
    rates = [h["learning_rate"] for h in losses]
    assert rates == [h["learning_rate"] for h in _losses(out)] and rates[0] == 0 and len(set(rates)) >= MAX_STEPS - 1
    norms = [h["grad_norm"] for h in losses]  # the norm the optimizer summed up, against the Trainer's own
    torch.testing.assert_close(norms, [h["grad_norm"] for h in _losses(out)], rtol=1e-5, atol=0)


def test_optimizer_in_backward_kill_then_auto_resume(workdir, tiny_clip_dir, in_backward_reference, runs, tmp_path):
    out = tmp_path / "run"
    flags = _stage2_flags(workdir, out, tiny_clip_dir, "--optim_in_backward", "True")
    runs.run(flags, tmp_path / "killed.log", block_at=7, where="step")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    runs.run(flags, tmp_path / "resumed.log")
    ours, expected = _full_weights(out), _full_weights(in_backward_reference)
    assert all(torch.equal(ours[k], expected[k]) for k in expected), "the weights differ"
    assert _losses(out) == _losses(in_backward_reference)


def test_grouped_sampler_order_is_a_function_of_seed_and_epoch():
    """A resumed run rebuilds its sampler: its order must come from (seed, epoch) alone."""
    from flash_vstream.train.vstream_trainer import ModalityLengthGroupedSampler

    lengths = [5, -3, 7, 2, -8, 4, 6, -1, 9, 3, -2, 8]

    def order(seed, epoch):
        sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=1, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) == order(0, 1) and sorted(order(0, 1)) == list(range(len(lengths)))
    assert order(0, 1) != order(0, 0) and order(2, 0) != order(0, 0)


def _sealed(run_dir, step):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"x" * 100)
    (folder / "sub").mkdir()
    (folder / "sub" / "shard").write_bytes(b"y" * 10)
    seal(str(folder), step)
    return folder


def test_auto_takes_the_newest_sealed_checkpoint_by_step(tmp_path, caplog):
    for step in (2, 9, 10):
        _sealed(tmp_path, step)
    (tmp_path / "checkpoint-12").mkdir()  # no marker
    (tmp_path / "checkpoint-15").mkdir()  # no marker, but a trainer state: maybe whole, from before markers
    (tmp_path / "checkpoint-15" / "trainer_state.json").write_text("{}")
    truncated = _sealed(tmp_path, 11)
    (truncated / "optimizer.pt").write_bytes(b"x" * 50)  # its files no longer match the marker
    missing = _sealed(tmp_path, 13)
    (missing / "sub" / "shard").unlink()
    (tmp_path / STAGING / "checkpoint-14").mkdir(parents=True)  # a killed save
    assert why_incomplete(str(tmp_path / "checkpoint-10")) is None
    assert why_incomplete(str(truncated)) == "optimizer.pt has 50 bytes, the marker says 100"
    assert why_incomplete(str(missing)) == os.path.join("sub", "shard") + " is missing"

    with caplog.at_level("WARNING"):
        assert resolve_auto(str(tmp_path), clean=False) == str(tmp_path / "checkpoint-10")
    assert len(checkpoint_folders(str(tmp_path))) == 7 and (tmp_path / STAGING).exists()  # only the main process cleans
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert resolve_auto(str(tmp_path), clean=True) == str(tmp_path / "checkpoint-10")
    assert [s for s, _ in checkpoint_folders(str(tmp_path))] == [2, 9, 10, 15]
    assert not (tmp_path / STAGING).exists()
    for name in ("checkpoint-11", "checkpoint-12", "checkpoint-13"):
        assert any(name in record.message and "removed" in record.message for record in caplog.records)
    assert any("checkpoint-14" in record.message for record in caplog.records)
    assert any("checkpoint-15 has no completion marker but a trainer state" in record.message
               for record in caplog.records)
    assert resolve_auto(str(tmp_path / "absent"), clean=True) is None


def test_rotate_keeps_the_newest_and_the_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _sealed(tmp_path, step)
    rotate(str(tmp_path), 2, keep=str(tmp_path / "checkpoint-2"))
    assert [s for s, _ in checkpoint_folders(str(tmp_path))] == [2, 5]
    rotate(str(tmp_path), None)
    assert len(checkpoint_folders(str(tmp_path))) == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-5"]


def test_staged_outputs_move_in_only_when_the_block_ends(tmp_path):
    out = tmp_path / "out"
    with staged_outputs(str(out), True) as staged:
        (pathlib.Path(staged) / "config.json").write_text("{}")
        (pathlib.Path(staged) / "mm_projector.bin").write_bytes(b"w")
        assert not (out / "config.json").exists()
    assert sorted(os.listdir(out)) == ["config.json", "mm_projector.bin"]
    with pytest.raises(RuntimeError):
        with staged_outputs(str(out), True) as staged:
            (pathlib.Path(staged) / "mm_projector.bin").write_bytes(b"new")
            raise RuntimeError("killed in the middle")
    assert (out / "mm_projector.bin").read_bytes() == b"w"


if __name__ == "__main__":
    _zygote()

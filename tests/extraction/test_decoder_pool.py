"""The decoder processes of extraction (flash_vstream.extraction.decode.DecoderPool): what they hand over
equals decoding in process, the slots bound what is in flight, a pool serves several runs, and a decoder
that dies fails only the file it had."""

import collections
import os
import signal
import time

import numpy as np
import pytest

from flash_vstream.extraction.decode import DecoderPool
from flash_vstream.video_io import iter_frames, read_frames

Job = collections.namedtuple("Job", "index source kind")
FRAME_BYTES = 64 * 48 * 3  # make_video's frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory, make_video):
    d = tmp_path_factory.mktemp("pool")
    make_video(d / "cfr.mp4", n=25, rate=10)  # 3 samples at 1 fps
    make_video(d / "long.mp4", n=120, rate=10)  # 12 samples
    make_video(d / "vfr.mp4", times=[0, 0.1, 0.3, 1.5, 1.6, 4.2])  # 5 samples
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 300)
    return d


def collect(pool, jobs, hold=None):
    """{job: (frames (T, H, W, 3), times)} and {job: error} from one run, each slot copied then released."""
    frames, times, errors, done = collections.defaultdict(list), collections.defaultdict(list), {}, []
    for message in pool.run(jobs):
        if message["tag"] == "frames":
            frames[message["job"]].append(message["frames"].numpy().copy())
            times[message["job"]].extend(message["times"])
            pool.release(message["slot"])
        elif message["tag"] == "error":
            errors[message["job"]] = message["error"]
        else:
            done.append(message["job"])
    return {j: (np.concatenate(frames[j]), times[j]) for j in done}, errors


def test_the_pool_hands_over_what_read_frames_decodes_and_serves_several_runs(clips):
    names = ["cfr.mp4", "long.mp4", "vfr.mp4", "broken.mp4"]
    jobs = [Job(i, str(clips / n), "video") for i, n in enumerate(names)]
    with DecoderPool(2, fps=1.0, slot_bytes=5 * FRAME_BYTES, slots=2) as pool:  # 5 frames a message
        assert pool.start_s > 0 and pool.num_workers == 2
        for _ in range(2):  # the same workers, warm, for a second run
            got, errors = collect(pool, jobs)
            assert sorted(got) == [0, 1, 2] and list(errors) == [3]
            assert "broken.mp4" in errors[3] and "cannot open" in errors[3]
            for i in got:
                expected, expected_times = read_frames(jobs[i].source, fps=1.0)
                assert got[i][1] == expected_times and np.array_equal(got[i][0], expected)
        stats = pool.stats()
        assert sum(s["files"] for s in stats) == 6 and sum(s["samples"] for s in stats) == 2 * (3 + 12 + 5)
        assert all(s["cpu_s"] >= 0 and s["wall_s"] > 0 for s in stats if s["files"])
    with pytest.raises(RuntimeError, match="closed"):
        next(pool.run(jobs))


def test_slots_bound_the_frames_in_flight(clips):
    source = str(clips / "long.mp4")
    expected, _ = read_frames(source, fps=1.0)
    with DecoderPool(1, fps=1.0, slot_bytes=FRAME_BYTES, slots=2) as pool:  # one frame a slot, two slots
        messages = pool.run([Job(0, source, "video")])
        held = [next(messages), next(messages)]
        time.sleep(0.5)  # the worker has no free slot now: it waits, and cannot overwrite what is held
        assert [m["times"] for m in held] == [[0.0], [1.0]]
        for k, m in enumerate(held):
            assert np.array_equal(m["frames"].numpy()[0], expected[k])
            pool.release(m["slot"])
        rest = []
        for m in messages:
            if m["tag"] == "frames":
                rest.append(m["frames"].numpy()[0].copy())
                pool.release(m["slot"])
        assert np.array_equal(np.stack(rest), expected[2:])
        assert pool.stats()[0]["slot_wait_s"] >= 0.4


def test_a_decoder_that_dies_fails_only_its_file(clips):
    jobs = [Job(0, str(clips / "long.mp4"), "video")] + [Job(i, str(clips / "cfr.mp4"), "video") for i in (1, 2, 3)]
    with DecoderPool(2, fps=1.0, slot_bytes=FRAME_BYTES, slots=2) as pool:
        failed, done, killed = {}, [], False
        for message in pool.run(jobs):
            if message["tag"] == "frames":
                rank = message["slot"][0]
                if message["job"] == 0 and not killed:  # 12 samples, 2 slots: it is mid-file now
                    os.kill(pool.pids[rank], signal.SIGKILL)
                    killed = True
                pool.release(message["slot"])
            elif message["tag"] == "error":
                failed[message["job"]] = message["error"]
            else:
                done.append(message["job"])
        assert list(failed) == [0] and "long.mp4" in failed[0] and "decoder process" in failed[0]
        assert sorted(done) == [1, 2, 3] and len(pool.alive) == 1
        got, errors = collect(pool, jobs[1:])  # the pool goes on with the worker left
        assert sorted(got) == [1, 2, 3] and not errors


def test_a_frame_larger_than_a_slot_fails_its_file_by_name(clips):
    with DecoderPool(1, fps=1.0, slot_bytes=FRAME_BYTES - 1) as pool:
        got, errors = collect(pool, [Job(0, str(clips / "cfr.mp4"), "video")])
    assert not got and "cfr.mp4" in errors[0] and "does not fit a decoder slot" in errors[0]


def _threads():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def test_one_decoder_thread_converts_on_that_thread_with_pyavs_pixels(example_mp4):
    """With threads=1 a decoder (FFmpeg's codec and its RGB conversion) runs on the calling thread: PyAV's
    `to_ndarray` would start a pool of one thread per core for every frame it converts. Same pixels."""
    import av

    before = _threads()
    frames, peak = [], before
    for frame, _ in iter_frames(example_mp4, fps=1.0, end=5.0, threads=1):
        frames.append(frame)
        peak = max(peak, _threads())
    assert peak == before and len(frames) == 6
    with av.open(example_mp4) as container:
        first = next(container.decode(video=0))
        assert np.array_equal(frames[0], first.to_ndarray(format="rgb24"))  # the first frame is sample 0

"""The synthetic stream benchmark: reproducible, decodable at exact 1 fps, answers right."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from flash_vstream.demo import synthetic as syn

SMALL = dict(num_train_streams=12, num_test_streams=6, stream_length=(40, 80), seed=3,
             train_questions_per_stream=10, test_questions_per_stream=5, captions_per_stream=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return syn.generate_dataset(tmp_path_factory.mktemp("synthetic"), **SMALL)


def _load(path):
    return json.loads(Path(path).read_text())


def _streams(paths):
    return {s.id: s for split in syn.SPLITS for s in syn.load_streams(paths[f"{split}_streams"])}


def _all_qa(paths):
    return _load(paths["train_qa"]) + _load(paths["test_qa"])


# ----------------------------------------------------------------- ground truth, per frame
# Recomputed from the scene list frame by frame, independently of the generator's helpers.


def _per_frame(spec):
    backgrounds = [scene.background for scene in spec.scenes for _ in range(scene.duration)]
    shapes = [scene.shapes for scene in spec.scenes for _ in range(scene.duration)]
    return backgrounds, shapes


def _runs(values):
    """[(value, run length)] of consecutive equal values."""
    runs = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return runs


def _first_index(items, predicate):
    return next(i for i, item in enumerate(items) if predicate(item))


def _check_answer(record, spec, config):
    t, q, a = record["time"], record["question"], record["answer"]
    bgs, shapes = _per_frame(spec)
    seen_bgs, seen_shapes = bgs[:t + 1], shapes[:t + 1]
    family = record["answer_type"]
    assert 0 <= t < spec.length == record["duration"]
    if family == "spatial":
        if q == "what colour is the background now?":
            assert a == bgs[t]
        else:
            kind = re.fullmatch(r"what colour is the (\w+) now\?", q).group(1)
            assert [s.color for s in shapes[t] if s.kind == kind] == [a]
    elif family == "start":
        first_scene_end = _first_index(bgs, lambda c: c != bgs[0]) - 1
        assert t - first_scene_end >= config.start_gap
        if q == "what colour was the background at the start?":
            assert a == bgs[0] != bgs[t]
        else:
            kind = re.fullmatch(r"what colour was the (\w+) at the start\?", q).group(1)
            assert [s.color for s in shapes[0] if s.kind == kind] == [a]
            assert (kind, a) not in {(s.kind, s.color) for s in shapes[t]}
    elif family == "order":
        m = re.fullmatch(r"which background came first, (\w+) or (\w+)\?", q)
        if m:
            first = {c: seen_bgs.index(c) for c in m.groups()}
        else:
            m = re.fullmatch(r"which shape came first, the (\w+) or the (\w+)\?", q)
            first = {k: _first_index(seen_shapes, lambda ss, k=k: any(s.kind == k for s in ss))
                     for k in m.groups()}
        x, y = m.groups()
        assert first[x] != first[y] and a == min(first, key=first.get)
    elif family == "longest":
        assert q == "what colour was the background of the longest scene?"
        runs = _runs(seen_bgs)  # consecutive scenes always change background
        best = max(range(len(runs)), key=lambda i: runs[i][1])
        assert runs[best][0] == a and best != len(runs) - 1
        assert all(n <= runs[best][1] - config.longest_margin for i, (_, n) in enumerate(runs) if i != best)
        totals = Counter(seen_bgs)
        assert all(n < totals[a] for c, n in totals.items() if c != a)
    elif family == "appeared":
        m = re.fullmatch(r"did a (\w+) background appear\?", q)
        if m:
            shown = m.group(1) in seen_bgs
        else:
            color, kind = re.fullmatch(r"did a (\w+) (\w+) appear\?", q).groups()
            shown = any(s.color == color and s.kind == kind for ss in seen_shapes for s in ss)
        assert a == ("yes" if shown else "no")
    else:
        raise AssertionError(f"unknown family {family}")


# ----------------------------------------------------------------- tests


def test_same_seed_same_data(dataset, tmp_path):
    again = syn.generate_dataset(tmp_path / "again", **SMALL)
    for key in ("train_qa", "test_qa", "train_streams", "test_streams", "pretrain", "finetune",
                "corpus", "meta"):
        assert Path(dataset[key]).read_bytes() == Path(again[key]).read_bytes(), key
    for name in ("train/train_0000.mp4", "test/test_0005.mp4"):
        a, ta = syn.read_mp4(Path(dataset["videos"]) / name)
        b, tb = syn.read_mp4(Path(again["videos"]) / name)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)
    other = syn.generate_dataset(tmp_path / "other", **{**SMALL, "seed": 4, "num_train_streams": 1,
                                                        "num_test_streams": 1})
    assert Path(other["test_qa"]).read_bytes() != Path(dataset["test_qa"]).read_bytes()


def test_stream_does_not_depend_on_stream_count(dataset):
    config = syn.SyntheticConfig()
    spec = syn.sample_stream("train_0003", syn._rng(SMALL["seed"], "train", 3, syn._SPEC), config)
    assert spec == _streams(dataset)["train_0003"]


def test_mp4_decodes_to_one_frame_per_second(dataset):
    for spec in list(_streams(dataset).values())[:4]:
        split = spec.id.split("_")[0]
        frames, times = syn.read_mp4(Path(dataset["root"]) / syn.video_relpath(split, spec.id))
        rendered = syn.render_stream(spec)
        assert frames.shape == rendered.shape == (spec.length, 64, 64, 3)
        np.testing.assert_array_equal(times, np.arange(spec.length))  # frame k shown at t = k s
        diff = np.abs(frames.astype(np.int16) - rendered.astype(np.int16))  # (T, H, W, 3)
        assert diff.mean() < 6  # only shape edges blur (4:2:0 chroma)
        assert np.median(diff, axis=(1, 2)).max() <= 4  # every frame's bulk colour is exact-ish


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_write_mp4_codecs(tmp_path, codec):
    if codec == "libx264" and syn.default_codec() != "libx264":
        pytest.skip("this PyAV build has no libx264")
    spec = syn.sample_stream("s", np.random.default_rng(0), syn.SyntheticConfig(stream_length=(12, 12)))
    rendered = syn.render_stream(spec)
    syn.write_mp4(rendered, tmp_path / "s.mp4", codec=codec)
    frames, times = syn.read_mp4(tmp_path / "s.mp4")
    np.testing.assert_array_equal(times, np.arange(12))
    assert np.abs(frames.astype(np.int16) - rendered).mean() < 8


def test_render_matches_spec(dataset):
    for spec in list(_streams(dataset).values())[:6]:
        frames = syn.render_stream(spec)
        bgs, shapes = _per_frame(spec)
        for t in range(0, spec.length, 3):
            pixels = frames[t].reshape(-1, 3)
            colors, counts = np.unique(pixels, axis=0, return_counts=True)
            assert tuple(colors[counts.argmax()]) == syn.COLORS[bgs[t]]
            assert counts.max() > 0.75 * len(pixels)  # the background dominates the frame
            for shape in shapes[t]:  # every shape is visible (own quadrant, never hidden)
                assert (pixels == syn.COLORS[shape.color]).all(axis=1).sum() >= 20
            np.testing.assert_array_equal(syn.render_frame(spec, t), frames[t])


def test_answers_follow_from_the_frames_seen(dataset):
    streams, config = _streams(dataset), syn.SyntheticConfig()
    records = _all_qa(dataset)
    for record in records:
        _check_answer(record, streams[record["video_id"]], config)
    shape_questions = [r for r in records if any(k in r["question"] for k in syn.SHAPES)]
    assert 0 < len(shape_questions) < len(records) / 2


def test_families_and_yes_no_balance(dataset):
    train, test = _load(dataset["train_qa"]), _load(dataset["test_qa"])
    assert {r["answer_type"] for r in test} == set(syn.FAMILIES)
    assert Counter(r["answer_type"] for r in train) == {f: 2 * SMALL["num_train_streams"] for f in syn.FAMILIES}
    yes_no = Counter(r["answer"] for r in train + test if r["answer_type"] == "appeared")
    assert set(yes_no) == {"yes", "no"}
    assert abs(yes_no["yes"] - yes_no["no"]) <= SMALL["num_test_streams"]  # train: exactly balanced
    assert all(" " not in r["answer"] for r in train + test)  # one-word answers


def test_json_formats(dataset):
    root = Path(dataset["root"])
    test = _load(dataset["test_qa"])
    for r in test:
        assert {"video_id", "question", "id", "answer", "answer_type", "duration", "time"} <= set(r)
        assert (root / r["video"]).is_file() and r["video"] == f"videos/test/{r['video_id']}.mp4"
    assert len({r["id"] for r in test}) == len(test)

    pretrain, finetune = _load(dataset["pretrain"]), _load(dataset["finetune"])
    assert len(pretrain) == SMALL["num_train_streams"] * SMALL["captions_per_stream"]
    assert len(finetune) == len(_load(dataset["train_qa"]))
    for r in pretrain + finetune:
        assert {"id", "video", "time", "conversations"} <= set(r)
        assert r["video"].startswith("videos/train/") and (root / r["video"]).is_file()
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and gpt["value"]
    assert all(r["conversations"][0]["value"] == "<image>\n" for r in pretrain)
    streams = _streams(dataset)
    first = pretrain[0]  # the first caption of a stream covers all of it
    assert first["time"] == streams[first["video"].split("/")[-1][:-4]].length - 1
    assert first["conversations"][1]["value"].count(", then ") == len(streams["train_0000"].scenes) - 1

    corpus = set(Path(dataset["corpus"]).read_text().splitlines())
    assert {r["question"] for r in test} <= corpus
    assert {r["conversations"][1]["value"] for r in pretrain} <= corpus


def test_rerun_reuses_and_overwrite_regenerates(tmp_path):
    kwargs = dict(num_train_streams=2, num_test_streams=1, stream_length=20, seed=1,
                  min_question_time=2, start_gap=3)
    paths = syn.generate_dataset(tmp_path, **kwargs)
    stamp = Path(paths["test_qa"]).stat().st_mtime_ns
    assert syn.generate_dataset(tmp_path, **kwargs) == paths
    assert Path(paths["test_qa"]).stat().st_mtime_ns == stamp
    syn.generate_dataset(tmp_path, **{**kwargs, "num_train_streams": 1})  # new settings
    assert sorted(p.name for p in Path(paths["train_videos"]).iterdir()) == ["train_0000.mp4"]
    assert len(_load(paths["pretrain"])) == 3


def test_cli(tmp_path, capsys):
    paths = syn.main(["--output", str(tmp_path), "--num-streams", "2", "--num-test-streams", "1",
                      "--min-length", "30", "--max-length", "30", "--frame-size", "32", "--seed", "5"])
    assert "test: 1 streams" in capsys.readouterr().out
    frames, _ = syn.read_mp4(Path(paths["test_videos"]) / "test_0000.mp4")
    assert frames.shape == (30, 32, 32, 3)
    settings = _load(paths["meta"])["settings"]
    assert settings["seed"] == 5 and settings["config"]["stream_length"] == [30, 30]


def test_config_is_validated():
    with pytest.raises(ValueError):
        syn.SyntheticConfig(frame_size=63)
    with pytest.raises(ValueError):
        syn.SyntheticConfig(shapes_per_scene=(1, 5))
    with pytest.raises(ValueError):
        syn.make_questions(syn.sample_stream("s", np.random.default_rng(0), syn.SyntheticConfig()),
                           1, np.random.default_rng(0), syn.SyntheticConfig(), families=("colour",))

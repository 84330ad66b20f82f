"""Atomic writes, JSONL reading, and the resumable store that inference and the judge share."""

import json
import os

import pytest

from flash_vstream.utils.files import (MalformedJsonl, ResumableJsonl, StaleFile, atomic_path, read_jsonl,
                                       temp_files_for, write_atomic, write_json, write_jsonl)


def test_write_atomic_text_bytes_and_json(tmp_path):
    path = str(tmp_path / "sub" / "f.txt")
    write_atomic(path, "héllo\n")
    assert open(path, encoding="utf-8").read() == "héllo\n"
    write_atomic(path, b"\x00\x01")
    assert open(path, "rb").read() == b"\x00\x01"
    write_json(path, {"a": [1, 2]})
    assert json.load(open(path)) == {"a": [1, 2]}
    with pytest.raises(TypeError):
        write_atomic(path, 3)
    assert sorted(os.listdir(tmp_path / "sub")) == ["f.txt"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "results.json")
    write_json(path, {"old": True})
    with pytest.raises(TypeError):
        write_json(path, {"new": object()})  # not serialisable: fails before anything is replaced
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write('{"half": ')
            raise RuntimeError("killed half way")
    assert json.load(open(path)) == {"old": True}
    assert temp_files_for(path) == [] and os.listdir(tmp_path) == ["results.json"]


def test_temp_files_of_a_killed_run_are_found(tmp_path):
    path = str(tmp_path / "v.safetensors")
    (tmp_path / ".v.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".w.safetensors.abc123.tmp").write_bytes(b"other file")
    assert temp_files_for(path) == [str(tmp_path / ".v.safetensors.abc123.tmp")]


def test_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "pred.jsonl"
    path.write_text('{"id": 1}\n\n[1, 2]\n{"id": 3}\n{"id": 4, "pr', encoding="utf-8")
    records, bad = read_jsonl(str(path))
    assert records == [{"id": 1}, {"id": 3}] and bad == [3, 5]
    with pytest.raises(MalformedJsonl, match=rf"^{path}:3: a JSON list, not an object") as err:
        read_jsonl(str(path), strict=True)
    assert (err.value.path, err.value.line) == (str(path), 3)
    path.write_text('{"id": 1}\n{"id": 2, "pr\n', encoding="utf-8")
    with pytest.raises(MalformedJsonl, match=rf"^{path}:2: not JSON"):
        read_jsonl(str(path), strict=True)


def store(path, run="A", on_mismatch="fresh", log=None):
    return ResumableJsonl(str(path), key=lambda r: r["key"], is_done=lambda r: "pred" in r,
                          foreign=lambda r: None if r.get("run") == run else f"key {r['key']!r}: run {r.get('run')!r}",
                          another_run="another model", on_mismatch=on_mismatch,
                          log=(log if log is not None else (lambda msg: None)))


def test_resumable_store_keeps_finished_lines_and_retries_the_rest(tmp_path):
    path = tmp_path / "out.jsonl"
    s = store(path)
    assert s.load() == {} and not path.exists()
    with s.appender() as append:
        append({"key": "a", "run": "A", "pred": "x"})
        append({"key": "b", "run": "A", "error": "bad input"})
        append(json.dumps({"key": "a", "run": "A", "pred": "repeat"}))
    with open(path, "a") as f:
        f.write('{"key": "c", "run": "A", "pr')  # killed mid-line
    messages = []
    done = store(path, log=messages.append).load()
    assert list(done) == ["a"] and done["a"]["pred"] == "x"
    assert read_jsonl(str(path)) == ([{"key": "a", "run": "A", "pred": "x"}], [])  # compacted, ends with \n
    assert "1 unreadable line(s) (first at line 4)" in messages[0] and "2 unfinished or repeated" in messages[0]
    other = tmp_path / "other.jsonl"
    write_jsonl(str(other), [{"key": "d", "run": "A", "pred": "y"}, {"key": "e", "run": "B", "pred": "z"}])
    assert s.done_keys_in([str(other), str(tmp_path / "absent.jsonl")]) == {"d"}


def test_resumable_store_never_mixes_runs(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(str(path), [{"key": "a", "run": "A", "pred": "x"}, {"key": "b", "run": "B", "pred": "y"}])
    with pytest.raises(StaleFile, match="1 line\\(s\\) come from another model \\(first: key 'b': run 'B'\\)"):
        store(path, on_mismatch="refuse").load()
    assert path.exists()
    messages = []
    assert store(path, log=messages.append).load() == {}
    assert not path.exists() and "moved it to" in messages[0]
    assert [p for p in os.listdir(tmp_path) if p.startswith("out.jsonl.stale-")]
    with pytest.raises(ValueError):
        store(path, on_mismatch="merge")

"""File helpers: atomic writes, JSONL reading and appending, and the resumable JSONL store.

Every writer here either replaces a file in one rename (readers see the old or the new file,
never half of one) or appends whole, fsynced lines (a killed process leaves at most one
truncated last line). The resumable store is what inference and the judge share: one line per
finished item, keyed, so a rerun does only the keys that have no finished line yet.
"""

import contextlib
import hashlib
import json
import os
import tempfile
import time

TEMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------- atomic writes

def _temp_prefix(path):
    return "." + os.path.basename(path) + "."


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; when the block ends without an exception the
    temporary file is fsynced and renamed to `path`, otherwise it is removed and `path` is left
    as it was. For writers that want a file name (safetensors' save_file, ...)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def temp_files_for(path):
    """Temporary files that `atomic_path(path)` left behind (a killed run), to be removed."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return []
    prefix = _temp_prefix(path)
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(TEMP_SUFFIX)]


def write_atomic(path, data):
    """Replace `path` with `data` (str: written as UTF-8; bytes: as they are) in one rename."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_atomic takes str or bytes, got {type(data).__name__}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(path, obj, indent=2, default=None):
    """Replace `path` with `obj` as JSON (UTF-8, a final newline) in one rename."""
    write_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=default) + "\n")


def write_jsonl(path, records):
    """Replace `path` with one JSON line per record in one rename."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- JSONL

class MalformedJsonl(ValueError):
    """A line of a JSONL file that is not a JSON object; the message starts with `path:line:`."""

    def __init__(self, path, line, reason):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line = path, line


def read_jsonl(path, strict=False):
    """(records, bad) of a JSONL file: the object lines, and the 1-based numbers of the lines
    that are not a JSON object (e.g. the truncated last line of a killed run); blank lines are
    ignored. With strict=True the first such line raises MalformedJsonl naming file and line."""
    records, bad = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                reason = None if isinstance(rec, dict) else f"a JSON {type(rec).__name__}, not an object"
            except json.JSONDecodeError as exc:
                reason = f"not JSON ({exc.msg} at column {exc.colno})"
            if reason is None:
                records.append(rec)
            elif strict:
                raise MalformedJsonl(path, n, reason)
            else:
                bad.append(n)
    return records, bad


def append_line(f, line):
    """Append one whole line to an open text file and force it to disk, so a killed process
    leaves at most one truncated last line behind."""
    f.write(line.rstrip("\n") + "\n")
    f.flush()
    os.fsync(f.fileno())


def ends_with_newline(path):
    """True for an empty file or one whose last byte is a newline (else the next append would glue on)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def set_aside(path):
    """Rename `path` to `path.stale-<time>` (kept for inspection, no longer read); returns the new name."""
    aside = f"{path}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, aside)
    return aside


# ---------------------------------------------------------------- the resumable store

class StaleFile(RuntimeError):
    """A result file holds lines of another run and the caller asked to refuse, not to start afresh."""


class ResumableJsonl:
    """A JSONL file of per-item results that a killed or repeated run resumes from.

    key(rec) -> str: the item a line belongs to.
    is_done(rec) -> bool: a finished line; a rerun skips its key. Other lines (errors, failures)
        are dropped when the file is loaded, so their items are tried again.
    foreign(rec) -> str | None: why a line comes from another run (another model, judge, ...),
        None for a line of this run. `another_run` says in words what such lines are.
    on_mismatch: "fresh" moves a file with foreign lines aside (`path.stale-<time>`) and starts an
        empty one; "refuse" raises StaleFile. Lines of two runs are never mixed.
    """

    def __init__(self, path, key, is_done, foreign, another_run="another run", on_mismatch="fresh", log=print):
        if on_mismatch not in ("fresh", "refuse"):
            raise ValueError(f"on_mismatch must be 'fresh' or 'refuse', got {on_mismatch!r}")
        self.path, self.key, self.is_done, self.foreign = path, key, is_done, foreign
        self.another_run, self.on_mismatch, self.log = another_run, on_mismatch, log

    def check(self):
        """Make sure the file holds no line of another run: move it aside or raise StaleFile."""
        if not os.path.exists(self.path):
            return
        records, _ = read_jsonl(self.path)
        reasons = [why for why in map(self.foreign, records) if why is not None]
        if not reasons:
            return
        why = f"{self.path}: {len(reasons)} line(s) come from {self.another_run} (first: {reasons[0]})"
        if self.on_mismatch == "refuse":
            raise StaleFile(f"{why}; move it away or pass --on-mismatch fresh")
        self.log(f"{why}; moved it to {set_aside(self.path)} and starting afresh")

    def load(self):
        """key -> finished line already in the file, after making the file safe to append to.

        The file is rewritten (atomically) without unreadable lines, unfinished lines and repeated
        keys, and always ends with a newline.
        """
        self.check()
        if not os.path.exists(self.path):
            return {}
        records, bad = read_jsonl(self.path)
        done = {}
        for r in records:
            if self.is_done(r):
                done.setdefault(self.key(r), r)
        if bad or len(done) != len(records) or not ends_with_newline(self.path):
            write_jsonl(self.path, done.values())
            unreadable = f"{len(bad)} unreadable line(s) (first at line {bad[0]})" if bad else "no unreadable line"
            self.log(f"{self.path}: kept {len(done)} finished line(s); dropped {unreadable} and "
                     f"{len(records) - len(done)} unfinished or repeated line(s), whose items are tried again")
        return done

    def done_keys_in(self, paths):
        """Keys finished by this run in other files (read only; a half-written line is skipped)."""
        keys = set()
        for path in paths:
            if os.path.exists(path):
                records, _ = read_jsonl(path)
                keys.update(self.key(r) for r in records if self.is_done(r) and self.foreign(r) is None)
        return keys

    @contextlib.contextmanager
    def appender(self):
        """Yield append(line): one record (or its JSON text) becomes one whole, fsynced line."""
        with open(self.path, "a", encoding="utf-8") as f:
            yield lambda line: append_line(f, line if isinstance(line, str) else json.dumps(line, ensure_ascii=False))

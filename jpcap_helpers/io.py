"""Small file helpers shared by every stage: atomic writes and append-only JSONL."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temp file beside ``path`` for writing; on success it is fsynced and renamed over ``path``
    (readers see the old file or the new one, never half of it); on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared (Drive, reports)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w", encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_copy_stream(stream, path: str | os.PathLike, chunk: int = 1 << 20) -> Path:
    """Copy a binary stream to ``path`` atomically (see :func:`atomic_open`)."""
    import shutil

    with atomic_open(path, "wb") as out:
        shutil.copyfileobj(stream, out, chunk)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as UTF-8 JSON (Japanese kept readable, not \\u-escaped)."""
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Atomically write ``rows`` as JSON lines."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Append rows to a JSONL file, each line flushed and fsynced; returns the number written.

    A kill can at worst leave a partial *last* line, which :func:`read_jsonl` skips when
    ``tolerate_partial_last`` is true.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    return n


def read_jsonl(path: str | os.PathLike, tolerate_partial_last: bool = False) -> Iterator[dict]:
    """Yield the records of a JSONL file; a malformed line raises ValueError naming file and line.

    With ``tolerate_partial_last`` a malformed final line without a newline (a write cut by a kill)
    is ignored instead.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_partial_last and i == len(lines) and not line.endswith("\n"):
                return
            raise ValueError(f"{path}: line {i} is not valid JSON ({e.msg})") from None


def repair_jsonl_tail(path: str | os.PathLike) -> bool:
    """Drop a partial last line left by a kill so appends start on a clean line; True if repaired."""
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    cut = data.rfind(b"\n") + 1
    atomic_write_text(path, data[:cut].decode("utf-8"))
    return True

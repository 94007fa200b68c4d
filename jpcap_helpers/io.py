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


# --------------------------------------------------------------------------- one writer per run folder

LOCK_ENV = "JPCAP_RUN_LOCKS"   # "<lock path>=<token>;..." handed to child processes (papermill kernels)


class RunLockedError(OSError):
    """Another process writes to this run folder; the message names it and the fix."""


def _lock_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inherited_tokens() -> dict[str, str]:
    pairs = (item.rsplit("=", 1) for item in os.environ.get(LOCK_ENV, "").split(";") if "=" in item)
    return {path: token for path, token in pairs}


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, purpose: str) -> Iterator[None]:
    """Hold the run folder's advisory lock while writing to it: one writer per run folder.

    Re-entrant in this process and in processes it starts (``jpcap run`` → notebook kernels → train);
    under ``accelerate launch`` rank 0 holds it for all ranks.
    A second writer gets :class:`RunLockedError` naming the holder's PID, command and start time. The
    lock is an OS file lock (``filelock``): a killed holder releases it, and the next writer takes over
    and says so.
    """
    import socket
    import sys
    import time
    import uuid

    from filelock import FileLock, Timeout

    if int(os.environ.get("RANK", "0") or 0) > 0:
        yield    # another process of the same `accelerate launch` (rank 0) holds it for the launch
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = (run_dir / ".jpcap.lock").resolve()
    info_path = run_dir / ".jpcap.lock.json"
    inherited = _inherited_tokens().get(str(lock_path))
    if inherited and _lock_info(info_path).get("token") == inherited:
        yield    # our parent holds it for us
        return
    lock = FileLock(str(lock_path), is_singleton=True, thread_local=False)
    if lock.is_locked:   # re-entry in this process
        with lock:
            yield
        return
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _lock_info(info_path)
        raise RunLockedError(
            f"{run_dir} is in use by PID {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"({holder.get('purpose', '?')}: {holder.get('command', '?')}), since {holder.get('started', '?')}. "
            "Wait for it to finish, stop it, or use another run name.") from None
    try:
        previous = _lock_info(info_path)
        if previous and previous.get("pid") != os.getpid():
            print(f"note: {run_dir}: took over the lock of PID {previous.get('pid')} "
                  f"({previous.get('purpose')}, started {previous.get('started')}), which is no longer running",
                  file=sys.stderr)
        token = uuid.uuid4().hex
        atomic_write_text(info_path, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
            "command": " ".join(sys.argv)[:300], "token": token,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        old_env = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = ";".join(filter(None, [old_env, f"{lock_path}={token}"]))
        try:
            yield
        finally:
            if old_env is None:
                os.environ.pop(LOCK_ENV, None)
            else:
                os.environ[LOCK_ENV] = old_env
            with contextlib.suppress(OSError):
                info_path.unlink()
    finally:
        lock.release()

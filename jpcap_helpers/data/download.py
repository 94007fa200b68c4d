"""Downloads: a resumable, retrying HTTP fetcher; STAIR, YJ and selected COCO images; ``fetch_raw``.

Nothing here runs offline except :func:`fetch_raw` for jp-shapes (generated, not downloaded).
"""
from __future__ import annotations

import http.client
import os
import re
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from ..io import atomic_copy_stream
from .images import load_image, safe_image_path
from .records import STAIR_TRAIN_FILE, STAIR_VAL_FILE, YJ_FILE, DataError, DownloadError, ImageLoadError
from .toy import generate_jp_shapes

STAIR_URL = "https://github.com/STAIR-Lab-CIT/STAIR-captions/raw/HEAD/stair_captions_v1.2.tar.gz"
YJ_URL = "https://github.com/yahoojapan/YJCaptions/raw/HEAD/yjcaptions26k.zip"
COCO_BASE_URL = "http://images.cocodataset.org"  # single images: {base}/{train2014|val2014}/{file}
COCO_ZIP_URLS = {
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",  # ~13 GB, 82,783 images
    "val2014": "http://images.cocodataset.org/zips/val2014.zip",      # ~6 GB, 40,504 images
}
USER_AGENT = "jpcap/0.1 (+https://github.com/; research data download)"


class _Retryable(Exception):
    pass


_RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of ``bytes start-end/total`` or ``bytes */total``."""
    if not value:
        return None, None
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value.strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _download_once(url: str, part: Path, expected_size: int | None, chunk: int, timeout: float,
                   progress: bool) -> None:
    """One attempt: resume ``part`` from its size with a Range request; raises on failure."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            _, total = _parse_content_range(e.headers.get("Content-Range"))
            if total == offset and (expected_size is None or expected_size == total):
                return  # the part file already holds the whole file
            part.unlink()
            raise _Retryable(f"HTTP 416 for a resume at byte {offset}: restarting") from None
        if e.code in _RETRY_HTTP:
            raise _Retryable(f"HTTP {e.code}") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    with resp:
        if resp.status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"server resumed at byte {start}, not {offset}: restarting")
            mode = "ab"
        else:  # 200: the server ignored the Range header, start over
            mode, offset = "wb", 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"{url}: server reports {total} bytes, expected {expected_size}")
        with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=part.name[:-5], disable=not progress,
                                          leave=False) as bar:
            try:
                while True:
                    buf = resp.read(chunk)
                    if not buf:
                        break
                    fh.write(buf)
                    bar.update(len(buf))
            finally:
                fh.flush()
                os.fsync(fh.fileno())
    size = part.stat().st_size
    want = total if total is not None else expected_size
    if want is not None and size < want:
        raise _Retryable(f"connection ended at byte {size} of {want}")
    if want is not None and size > want:
        part.unlink()
        raise _Retryable(f"got {size} bytes, more than the {want} announced: restarting")


def download_file(url: str, dest: str | os.PathLike, *, expected_size: int | None = None, chunk: int = 1 << 20,
                  retries: int = 3, timeout: float = 60, progress: bool = True, backoff: float = 1.0) -> Path:
    """Download ``url`` to ``dest``, resumable: bytes go to ``dest + '.part'`` (continued with an
    HTTP Range request after an interruption) and the part is renamed to ``dest`` only when complete.

    An existing ``dest`` (of ``expected_size`` when given) is kept. Network errors, 5xx/408/429 and
    short reads are retried ``retries`` times with exponential backoff (``backoff`` * 1, 2, 4 ... s);
    other HTTP errors fail at once. Raises :class:`DownloadError`.
    """
    dest = Path(dest)
    if dest.exists() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _download_once(url, part, expected_size, chunk, timeout, progress)
            os.replace(part, dest)
            return dest
        except DownloadError:
            raise
        except (_Retryable, urllib.error.URLError, http.client.HTTPException, ConnectionError,
                socket.timeout, TimeoutError) as e:
            last = e
    raise DownloadError(f"{url}: failed after {retries + 1} attempt(s): {type(last).__name__}: {last}")


def download_stair(dest_dir: str | os.PathLike, *, url: str = STAIR_URL, progress: bool = True,
                   keep_archive: bool = True) -> dict[str, Path]:
    """Fetch STAIR Captions v1.2 and extract its train/val JSON into ``dest_dir`` (skipped if there)."""
    dest_dir = Path(dest_dir)
    wanted = {STAIR_TRAIN_FILE: "train", STAIR_VAL_FILE: "val"}
    out = {split: dest_dir / name for name, split in wanted.items()}
    if all(p.exists() for p in out.values()):
        return out
    archive = download_file(url, dest_dir / url.rsplit("/", 1)[-1], progress=progress)
    found = set()
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in wanted:
                    atomic_copy_stream(tf.extractfile(member), dest_dir / name)  # by basename: no path tricks
                    found.add(name)
    except tarfile.TarError as e:
        raise DownloadError(f"{archive}: not a readable tar archive ({e})") from None
    if set(wanted) - found:
        raise DownloadError(f"{archive}: lacks {sorted(set(wanted) - found)}")
    if not keep_archive:
        archive.unlink()
    return out


def download_yj(dest_dir: str | os.PathLike, *, url: str = YJ_URL, progress: bool = True,
                keep_archive: bool = True) -> Path:
    """Fetch YJ Captions 26k and extract ``yjcaptions26k_clean.json`` into ``dest_dir``."""
    dest_dir = Path(dest_dir)
    dest = dest_dir / YJ_FILE
    if dest.exists():
        return dest
    archive = download_file(url, dest_dir / url.rsplit("/", 1)[-1], progress=progress)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if m.filename.rsplit("/", 1)[-1] == YJ_FILE]
            if not members:
                raise DownloadError(f"{archive}: lacks {YJ_FILE}")
            with zf.open(members[0]) as stream:
                atomic_copy_stream(stream, dest)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive}: not a readable zip archive ({e})") from None
    if not keep_archive:
        archive.unlink()
    return dest


def download_coco_images(file_names: Iterable[str], images_root: str | os.PathLike, *,
                         base_url: str = COCO_BASE_URL, workers: int = 16, progress: bool = True,
                         retries: int = 2, timeout: float = 60, backoff: float = 1.0) -> dict:
    """Fetch only the COCO images named (``train2014/COCO_train2014_...jpg``) into ``images_root``.

    Parallel (threads); a file already present that decodes is skipped; each download must decode
    with PIL, else it is deleted and fetched again (``retries`` times) and then reported.
    Returns ``{requested, downloaded, skipped_existing, failed: {file_name: reason}}``.
    """
    root = Path(images_root)
    names = sorted(set(file_names))
    counts = {"requested": len(names), "downloaded": 0, "skipped_existing": 0, "failed": {}}

    def decode_problem(path: Path) -> str | None:
        try:
            load_image(path, max_side=64)  # draft decode: reads the whole stream, cheaply
        except ImageLoadError as e:
            return e.reason + (f" ({e.detail})" if e.detail else "")
        return None

    def fetch(name: str) -> tuple[str, str | None]:
        try:
            dest = safe_image_path(root, name)
        except ImageLoadError:
            return "failed", "unsafe file name"
        if not name or dest.is_dir():
            return "failed", "unsafe file name"
        if dest.exists():
            if decode_problem(dest) is None:
                return "skipped_existing", None
            dest.unlink()  # a corrupt leftover: fetch it again
        url = f"{base_url.rstrip('/')}/{urllib.parse.quote(name)}"
        problem = None
        for _ in range(retries + 1):
            try:
                download_file(url, dest, retries=retries, timeout=timeout, progress=False, backoff=backoff)
            except DownloadError as e:
                return "failed", str(e)
            problem = decode_problem(dest)
            if problem is None:
                return "downloaded", None
            dest.unlink(missing_ok=True)
        return "failed", f"does not decode after {retries + 1} download(s): {problem}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(names), desc="COCO images", unit="img", disable=not progress) as bar:
        futures = {pool.submit(fetch, n): n for n in names}
        for fut in as_completed(futures):
            status, reason = fut.result()
            if status == "failed":
                counts["failed"][futures[fut]] = reason
            else:
                counts[status] += 1
            bar.update(1)
    counts["failed"] = dict(sorted(counts["failed"].items()))
    return counts


def fetch_raw(params) -> dict:
    """Get the raw annotation files for ``params.data``: generate jp-shapes offline, or (``source:
    stair`` with ``download: true``) fetch STAIR and YJ. COCO images come later, per subset
    (:func:`prepare_from_params`). Returns where everything is."""
    d = params.data
    root = Path(d.root)
    if d.source == "jp-shapes":
        summary = generate_jp_shapes(root, n_train=d.toy.n_train, n_val=d.toy.n_val, n_yj=d.toy.n_yj,
                                     yj_train_overlap=d.toy.yj_train_overlap, image_sizes=d.toy.image_sizes,
                                     seed=d.toy.seed)
        return {"source": "jp-shapes", "root": str(root), "files": summary["files"]}
    files = {"stair_train": root / STAIR_TRAIN_FILE, "stair_val": root / STAIR_VAL_FILE}
    if d.use_yj:
        files["yj"] = root / YJ_FILE
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing and not d.download:
        raise DataError(f"missing {', '.join(missing)}: set data.download: true or put the files in {root}")
    if missing:
        download_stair(root)
        if d.use_yj:
            download_yj(root)
    return {"source": "stair", "root": str(root),
            "files": {k: {"path": str(p), "bytes": p.stat().st_size} for k, p in files.items()}}


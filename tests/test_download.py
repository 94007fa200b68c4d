"""Offline tests of the download helpers against a local HTTP server with Range support."""
from __future__ import annotations

import io
import os
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jpcap_helpers import data as D


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` (path -> bytes) honouring ``Range: bytes=N-``.

    ``server.actions[path]`` is a list of one-shot faults consumed per request: ``"503"`` (error),
    ``"cut"`` (send half the body, then drop the connection), ``"ignore_range"`` (answer 200).
    Every request is logged as ``(path, range header, body bytes sent)``.
    """

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        with srv.lock:
            queue = srv.actions.get(path) or []
            action = queue.pop(0) if queue else None
        entry = [path, rng, 0]
        with srv.lock:
            srv.log.append(entry)
        if action == "503":
            self.send_error(503, "try later")
            return
        body = srv.files.get(path)
        if body is None:
            self.send_error(404, "no such file")
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and action != "ignore_range":
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if action == "cut":
            payload = payload[: len(payload) // 2]
            self.close_connection = True
        self.wfile.write(payload)
        self.wfile.flush()
        entry[2] = len(payload)


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.actions, srv.log, srv.lock = {}, {}, [], threading.Lock()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def jpeg_bytes(seed: int = 0, size=(48, 32)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


# --------------------------------------------------------------------------- download_file


def test_full_download(server, tmp_path):
    server.files["/f.bin"] = data = blob(300_000)
    dest = D.download_file(server.base + "/f.bin", tmp_path / "sub" / "f.bin", chunk=65536, progress=False)
    assert dest.read_bytes() == data
    assert not (tmp_path / "sub" / "f.bin.part").exists()
    assert server.log == [["/f.bin", None, 300_000]]
    # Present already (of the expected size): no request at all.
    D.download_file(server.base + "/f.bin", dest, expected_size=300_000, progress=False)
    assert len(server.log) == 1


def test_resume_from_part_requests_only_the_rest(server, tmp_path):
    server.files["/f.bin"] = data = blob(250_000, seed=1)
    dest = tmp_path / "f.bin"
    Path(str(dest) + ".part").write_bytes(data[:100_000])
    D.download_file(server.base + "/f.bin", dest, expected_size=250_000, progress=False)
    assert dest.read_bytes() == data
    assert server.log == [["/f.bin", "bytes=100000-", 150_000]]


def test_complete_part_is_finished_without_body(server, tmp_path):
    server.files["/f.bin"] = data = blob(5_000, seed=2)
    dest = tmp_path / "f.bin"
    Path(str(dest) + ".part").write_bytes(data)
    D.download_file(server.base + "/f.bin", dest, progress=False)
    assert dest.read_bytes() == data and server.log == [["/f.bin", "bytes=5000-", 0]]  # 416 -> done


def test_retry_after_server_error(server, tmp_path):
    server.files["/f.bin"] = data = blob(10_000, seed=3)
    server.actions["/f.bin"] = ["503", "503"]
    dest = D.download_file(server.base + "/f.bin", tmp_path / "f.bin", retries=3, backoff=0.01, progress=False)
    assert dest.read_bytes() == data
    assert [e[2] for e in server.log] == [0, 0, 10_000]


def test_cut_connection_resumes_where_it_stopped(server, tmp_path):
    server.files["/f.bin"] = data = blob(200_000, seed=4)
    server.actions["/f.bin"] = ["cut"]
    dest = D.download_file(server.base + "/f.bin", tmp_path / "f.bin", chunk=4096, backoff=0.01, progress=False)
    assert dest.read_bytes() == data
    (p1, r1, sent1), (p2, r2, sent2) = server.log
    assert r1 is None and sent1 == 100_000
    resumed_at = int(r2.split("=")[1].rstrip("-"))
    assert 0 < resumed_at <= sent1 and sent2 == 200_000 - resumed_at   # only the missing bytes again


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.files["/f.bin"] = data = blob(20_000, seed=5)
    server.actions["/f.bin"] = ["ignore_range"]
    dest = tmp_path / "f.bin"
    Path(str(dest) + ".part").write_bytes(b"x" * 7_000)
    D.download_file(server.base + "/f.bin", dest, progress=False)
    assert dest.read_bytes() == data


def test_permanent_and_exhausted_failures(server, tmp_path):
    with pytest.raises(D.DownloadError, match="HTTP 404"):
        D.download_file(server.base + "/nope", tmp_path / "nope", retries=3, backoff=0.01, progress=False)
    assert len(server.log) == 1                                   # a 404 is not retried
    server.files["/f.bin"] = blob(100)
    server.actions["/f.bin"] = ["503"] * 10
    with pytest.raises(D.DownloadError, match="after 3 attempt"):
        D.download_file(server.base + "/f.bin", tmp_path / "f.bin", retries=2, backoff=0.01, progress=False)
    assert len(server.log) == 1 + 3
    assert not (tmp_path / "f.bin").exists()


def test_size_mismatch_is_an_error(server, tmp_path):
    server.files["/f.bin"] = blob(1_000)
    with pytest.raises(D.DownloadError, match="expected 999"):
        D.download_file(server.base + "/f.bin", tmp_path / "f.bin", expected_size=999, progress=False)
    assert not (tmp_path / "f.bin").exists()


# --------------------------------------------------------------------------- archives


def test_download_stair_and_yj_extract_the_right_files(server, tmp_path):
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:gz") as tf:
        for name, text in [("STAIR-captions/stair_captions_v1.2_train.json", '{"t": 1}'),
                           ("STAIR-captions/stair_captions_v1.2_val.json", '{"v": 1}'),
                           ("STAIR-captions/stair_captions_v1.2_train_tokenized.json", '{"x": 1}')]:
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    server.files["/stair_captions_v1.2.tar.gz"] = tar_buf.getvalue()
    zip_buf = io.BytesIO()
    with zipfile.ZipFile(zip_buf, "w") as zf:
        zf.writestr("yjcaptions26k/yjcaptions26k_clean.json", '{"yj": 1}')
        zf.writestr("yjcaptions26k/README", "x")
    server.files["/yjcaptions26k.zip"] = zip_buf.getvalue()

    out = tmp_path / "raw"
    paths = D.download_stair(out, url=server.base + "/stair_captions_v1.2.tar.gz", progress=False)
    assert paths["train"].read_text() == '{"t": 1}' and paths["val"].read_text() == '{"v": 1}'
    assert not (out / "stair_captions_v1.2_train_tokenized.json").exists()
    yj = D.download_yj(out, url=server.base + "/yjcaptions26k.zip", progress=False)
    assert yj == out / D.YJ_FILE and yj.read_text() == '{"yj": 1}'
    n = len(server.log)
    D.download_stair(out, url=server.base + "/stair_captions_v1.2.tar.gz", progress=False)
    D.download_yj(out, url=server.base + "/yjcaptions26k.zip", progress=False)
    assert len(server.log) == n                                   # already there: nothing fetched


# --------------------------------------------------------------------------- COCO images


def test_download_coco_images_parallel(server, tmp_path):
    names = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in range(1, 7)] + [
        "val2014/COCO_val2014_000000000100.jpg", "val2014/COCO_val2014_000000000101.jpg",
        "val2014/COCO_val2014_000000000102.jpg"]
    for k, name in enumerate(names[:-2]):
        server.files[f"/coco/{name}"] = jpeg_bytes(seed=k)
    server.files["/coco/" + names[-2]] = b"<html>not an image</html>"       # corrupt on the server
    # names[-1]: absent on the server (404)
    root = tmp_path / "coco"
    present = root / names[0]
    present.parent.mkdir(parents=True)
    present.write_bytes(jpeg_bytes(seed=0))                                  # already there, decodes
    broken_local = root / names[1]
    broken_local.write_bytes(jpeg_bytes(seed=1)[:100])                      # a truncated leftover
    server.actions["/coco/" + names[2]] = ["503"]                           # one transient failure

    result = D.download_coco_images(names + [names[3]], root, base_url=server.base + "/coco", workers=4,
                                    retries=2, backoff=0.01, progress=False)
    assert result["requested"] == 9
    assert result["skipped_existing"] == 1 and result["downloaded"] == 6
    assert set(result["failed"]) == {names[-2], names[-1]}
    assert "does not decode" in result["failed"][names[-2]] and "HTTP 404" in result["failed"][names[-1]]
    requested = [e[0] for e in server.log]
    assert "/coco/" + names[0] not in requested                              # skipped, never fetched
    assert requested.count("/coco/" + names[-2]) == 3                         # corrupt: fetched 1 + 2 retries
    assert not (root / names[-2]).exists() and not (root / names[-1]).exists()
    for name in names[:-2]:
        assert D.check_image(root / name) is None
    assert not list(root.rglob("*.part"))
    # A second run finds everything that worked in place.
    again = D.download_coco_images(names[:-2], root, base_url=server.base + "/coco", progress=False)
    assert again["skipped_existing"] == 7 and again["downloaded"] == 0 and again["failed"] == {}


def test_unsafe_names_are_refused(tmp_path):
    result = D.download_coco_images(["../evil.jpg", "/abs.jpg"], tmp_path, base_url="http://127.0.0.1:9",
                                    progress=False)
    assert result["failed"] == {"../evil.jpg": "unsafe file name", "/abs.jpg": "unsafe file name"}
    assert not any(tmp_path.parent.glob("evil.jpg"))
    assert os.listdir(tmp_path) == []


def test_escaping_names_are_refused_like_in_prepare(tmp_path):
    """The same path rule as the image lookup: backslashes, drive letters and symlinks out are refused."""
    root = tmp_path / "coco"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "linkdir")
    bad = ["..\\evil.jpg", "C:\\evil.jpg", "sub/../../evil.jpg", "linkdir/evil.jpg", "", "."]
    result = D.download_coco_images(bad, root, base_url="http://127.0.0.1:9", progress=False)
    assert result["failed"] == {name: "unsafe file name" for name in bad}
    assert os.listdir(outside) == [] and os.listdir(root) == ["linkdir"]


def test_colab_route_fetches_only_the_selected_images(server, tmp_path):
    """prepare without checks -> split_file_names -> download_coco_images -> prepare with checks."""
    src = tmp_path / "jp-shapes"
    D.generate_jp_shapes(src, n_train=30, n_val=24, n_yj=12, image_sizes=((56, 56),))
    for folder in ("train2014", "val2014"):
        for f in (src / folder).iterdir():
            server.files[f"/coco/{folder}/{f.name}"] = f.read_bytes()
    images = tmp_path / "coco"                                  # empty: nothing downloaded yet
    images.mkdir()
    kw = dict(yj_path=src / D.YJ_FILE, val_size=6, test_size=8, train_subset=10, progress=False)
    first = D.prepare_dataset(src, images, tmp_path / "p1", check_images=False, **kw)
    names = D.split_file_names(tmp_path / "p1")
    expected = {r.file_name for s in D.SPLIT_NAMES for r in D.load_split(tmp_path / "p1" / f"{s}.jsonl")}
    assert names == sorted(expected) and len(names) >= first["splits"]["train"]["images"] + 6 + 8
    got = D.download_coco_images(names, images, base_url=server.base + "/coco", workers=4, progress=False)
    assert got["downloaded"] == len(names) and got["failed"] == {}
    assert len(list(images.rglob("*.jpg"))) == len(names) < 30 + 24   # only the selected images
    second = D.prepare_dataset(src, images, tmp_path / "p2", **kw)
    assert second["image_checks"]["files_skipped"] == 0
    assert second["splits"] == first["splits"]

"""Offline tests of jpcap_helpers.data: loaders, image checks, cleaning, splits, prepare, CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jpcap_helpers import data as D
from jpcap_helpers.cli import main as jpcap_main
from jpcap_helpers.data import DataError, ImageRecord
from jpcap_helpers.data import prepare as data_prepare
from jpcap_helpers.models.image_rules import processor_rejection

# --------------------------------------------------------------------------- fixture builders


def coco_name(sub: str, image_id: int) -> str:
    return f"COCO_{sub}_{image_id:012d}.jpg"


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def save_jpeg(path: Path, size=(64, 48), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=90)
    return path


def noisy_jpeg_bytes(size=(256, 256), seed=0) -> bytes:
    import io

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


FULLWIDTH = "ＡＢＣの　ボール が ある．"          # NFKC + period + spaces between Japanese chars
FULLWIDTH_CLEAN = "ABCのボールがある。"


@pytest.fixture
def messy_stair(tmp_path):
    """A STAIR-format train file with every kind of bad caption, and its COCO image root."""
    root = tmp_path / "coco"
    for i in (1, 2, 3, 4, 5):
        save_jpeg(root / "train2014" / coco_name("train2014", i))
    images = [{"id": i, "file_name": coco_name("train2014", i)} for i in (1, 2, 3, 4, 5)]
    images.append({"id": 5, "file_name": coco_name("train2014", 5)})           # duplicate image entry
    anns = [
        {"id": 1, "image_id": 1, "caption": "犬が走っている。"},
        {"id": 2, "image_id": 1, "caption": None},                                # null
        {"id": 3, "image_id": 1, "caption": 123},                                 # number
        {"id": 4, "image_id": 1, "caption": ""},                                  # empty
        {"id": 5, "image_id": 1, "caption": " \u3000\t "},                        # whitespace only
        {"id": 6, "image_id": 2, "caption": "😀🎉"},                              # emoji only
        {"id": 1, "image_id": 2, "caption": "重複したID"},                          # duplicate annotation id
        {"id": 7, "image_id": 999, "caption": "存在しない画像"},                     # unknown image
        {"id": 8, "image_id": 2, "caption": FULLWIDTH},                           # full-width text
        {"id": 9, "image_id": 3, "caption": "猫が寝ている。"},
        {"id": 10, "image_id": 5, "caption": "鳥が飛んでいる。"},
        # image 4: no captions at all
    ]
    path = write_json(tmp_path / "stair_captions_v1.2_train.json", {"images": images, "annotations": anns})
    return path, root


# --------------------------------------------------------------------------- loading


def test_load_messy_stair_counts(messy_stair):
    path, _ = messy_stair
    records, rep = D.load_coco_captions(path)
    assert [r.image_id for r in records] == [1, 2, 3, 5]
    assert records[0] == ImageRecord(1, "train2014/" + coco_name("train2014", 1), ["犬が走っている。"])
    assert records[1].captions == ["😀🎉", FULLWIDTH]          # loading does not normalise
    assert rep.n_annotations == 11 and rep.n_images == 6
    assert rep.n_captions == 5 and rep.n_records == 4
    assert rep.dropped_counts() == {"caption_empty": 2, "caption_not_string": 1, "caption_null": 1,
                                    "duplicate_annotation_id": 1, "unknown_image_id": 1}
    assert rep.images_without_captions == [4]
    assert rep.duplicate_image_entries == [5]
    dup = [d for d in rep.dropped_captions if d["reason"] == "duplicate_annotation_id"]
    assert dup == [{"annotation_id": 1, "image_id": 2, "reason": "duplicate_annotation_id"}]
    summary = rep.as_dict()
    assert summary["dropped_caption_examples"]["unknown_image_id"] == [{"annotation_id": 7, "image_id": 999}]
    json.dumps(summary)  # JSON-ready


def test_load_yj_without_file_names(tmp_path):
    """YJ-style entries: coco_url, flickr_url only, bare id (probed in images_root), unresolvable."""
    root = tmp_path / "coco"
    save_jpeg(root / "val2014" / coco_name("val2014", 30))           # found by probing
    images = [
        {"id": 10, "coco_url": "http://images.cocodataset.org/val2014/" + coco_name("val2014", 10)},
        {"id": 20, "flickr_url": "http://farm.example/x.jpg"},          # no COCO name anywhere
        {"id": 30},
        {"id": 40, "file_name": coco_name("train2014", 40)},
    ]
    anns = [{"id": k, "image_id": i, "caption": f"画像{i}の説明"} for k, i in enumerate([10, 20, 30, 40, 40])]
    path = write_json(tmp_path / "yjcaptions26k_clean.json", {"images": images, "annotations": anns})

    records, rep = D.load_coco_captions(path, images_root=root)
    assert {r.image_id: r.file_name for r in records} == {
        10: "val2014/" + coco_name("val2014", 10),
        30: "val2014/" + coco_name("val2014", 30),
        40: "train2014/" + coco_name("train2014", 40),
    }
    assert rep.unresolved_images == [20]
    assert rep.dropped_counts() == {"image_file_name_unresolved": 1}
    assert rep.file_name_sources == {"coco_url": 1, "file_name": 1, "probed": 1}

    # An explicit subfolder resolves the rest from the id.
    records, rep = D.load_coco_captions(path, subfolder="train2014")
    assert {r.image_id: r.file_name for r in records}[20] == "train2014/" + coco_name("train2014", 20)
    assert rep.file_name_sources["guessed"] == 2


def test_load_guesses_subfolder_from_file_name_and_2017_names(tmp_path):
    images = [{"id": 7}, {"id": 8, "file_name": "000000000008.jpg"}]
    anns = [{"id": 1, "image_id": 7, "caption": "a"}, {"id": 2, "image_id": 8, "caption": "b"}]
    path = write_json(tmp_path / "stair_captions_v1.2_val.json", {"images": images, "annotations": anns})
    records, _ = D.load_coco_captions(path)
    assert [r.file_name for r in records] == ["val2014/" + coco_name("val2014", 7),
                                              "val2014/" + coco_name("val2014", 8)]


def test_annotations_without_any_id_get_positional_ids(tmp_path):
    path = write_json(tmp_path / "yj.json", {"images": [{"id": 1, "file_name": coco_name("train2014", 1)}],
                                             "annotations": [{"image_id": 1, "caption": "x"},
                                                             {"image_id": 1, "caption": "y"}]})
    records, rep = D.load_coco_captions(path)
    assert records[0].captions == ["x", "y"] and rep.annotation_ids_synthesized


@pytest.mark.parametrize("content, needle", [
    ('{"images": [], "annotations": [,]}', "not valid JSON"),
    ('{"images": []}', "missing key 'annotations'"),
    ('[1, 2]', "top level"),
    ('{"images": {}, "annotations": []}', "'images' must be a list"),
    ('{"images": [{"file_name": "a.jpg"}], "annotations": []}', "images[0] has no key 'id'"),
    ('{"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1}]}', "annotations[0] has no key 'caption'"),
    ('{"images": [{"id": 1}], "annotations": [{"id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}]}',
     "2 malformed entries"),
    ('{"images": [{"id": "abc"}], "annotations": []}', "not an integer"),
])
def test_malformed_file_raises_one_data_error(tmp_path, content, needle):
    path = tmp_path / "bad_captions.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as exc:
        D.load_coco_captions(path)
    assert isinstance(exc.value, ValueError)
    assert "bad_captions.json" in str(exc.value) and needle in str(exc.value)


def test_missing_captions_file(tmp_path):
    with pytest.raises(DataError, match="nope.json: captions file not found"):
        D.load_coco_captions(tmp_path / "nope.json")


def test_absolute_and_backslash_names_are_kept_for_the_path_check(tmp_path):
    """The loader does not repair escaping names (``/etc/passwd`` stays absolute): the lookup refuses them."""
    images = [{"id": 1, "file_name": "/etc/passwd"}, {"id": 2, "file_name": "..\\outside\\secret.png"},
              {"id": 3, "file_name": "C:\\x.png"}]
    anns = [{"id": i, "image_id": i, "caption": "x"} for i in (1, 2, 3)]
    records, _ = D.load_coco_captions(write_json(tmp_path / "mixed.json", {"images": images, "annotations": anns}))
    assert [r.file_name for r in records] == ["/etc/passwd", "../outside/secret.png", "C:/x.png"]


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe{\x00\"images\x00", "not UTF-8 text"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),
    (b"hello, not json", "not valid JSON (line 1, column 1"),
    (b"", "not valid JSON (the file is empty)"),
    (b"  \n", "not valid JSON (the file is empty)"),
])
def test_unreadable_captions_file_is_one_error_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "stair_captions_v1.2_val.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        D.load_coco_captions(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg


def test_bom_is_accepted_and_folder_is_named(tmp_path):
    path = tmp_path / "caps.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": [], "annotations": []}).encode())
    assert D.load_coco_captions(path)[0] == []
    with pytest.raises(DataError, match="captions file not found \\(it is a folder\\)"):
        D.load_coco_captions(tmp_path)


def test_non_utf8_split_and_karpathy_files_name_the_file(tmp_path):
    split = tmp_path / "val.jsonl"
    split.write_bytes(b'{"image_id": 1, "file_name": "a.jpg", "captions": ["\xff"]}\n')
    with pytest.raises(DataError, match="val.jsonl: not UTF-8 text"):
        D.load_split(split)
    kp = tmp_path / "dataset_coco.json"
    kp.write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="dataset_coco.json: not UTF-8 text"):
        D.make_splits([], [], karpathy_path=kp)


# --------------------------------------------------------------------------- image paths stay inside the images folder


@pytest.fixture
def escape_case(tmp_path):
    """An images root with one legal image, and a valid image *outside* it that no name may reach."""
    root = tmp_path / "images"
    save_jpeg(root / "ok.png")
    save_jpeg(root / "sub" / "inner.png")
    outside = tmp_path / "outside"
    secret = save_jpeg(outside / "secret.png")
    save_jpeg(tmp_path / "x.png")
    os.symlink(secret, root / "link.png")                     # a file symlink inside, pointing outside
    os.symlink(outside, root / "linkdir")                     # a folder symlink inside, pointing outside
    os.symlink(root / "sub" / "inner.png", root / "inner_link.png")   # a symlink that stays inside
    return root, secret


ESCAPING = ["../outside/secret.png", "..\\outside\\secret.png", "sub/../../x.png", "/etc/passwd", "C:\\x.png",
            "C:x.png", "\\\\server\\share\\x.png", "link.png", "linkdir/secret.png", "sub/../linkdir/secret.png",
            "..", "nul\0byte.png"]


@pytest.mark.parametrize("name", ESCAPING)
def test_escaping_image_names_are_refused(escape_case, name):
    root, _ = escape_case
    for fn in (D.safe_image_path, D.resolve_image_path):
        with pytest.raises(D.ImageLoadError) as exc:
            fn(root, name)
        assert exc.value.reason == "outside_images_root"


def test_names_that_stay_inside_are_fine(escape_case):
    root, _ = escape_case
    assert D.resolve_image_path(root, "sub/../ok.png") == root / "sub/../ok.png"
    assert D.resolve_image_path(root, "sub\\inner.png") == root / "sub" / "inner.png"
    assert D.resolve_image_path(root, "inner_link.png") == root / "inner_link.png"
    assert D.resolve_image_path(root, "train2014/ok.png") == root / "ok.png"     # the flat layout
    assert D.resolve_image_path(root, "val2014/absent.png") == root / "val2014/absent.png"
    link_root = root.parent / "root_link"                     # the images folder itself may be a symlink
    os.symlink(root, link_root)
    assert D.resolve_image_path(link_root, "ok.png") == link_root / "ok.png"
    assert D.check_image(D.resolve_image_path(root, "sub/../ok.png")) is None


def test_flat_fallback_through_an_outside_symlink_is_refused(escape_case):
    root, _ = escape_case
    with pytest.raises(D.ImageLoadError, match="outside_images_root"):
        D.resolve_image_path(root, "train2014/link.png")    # absent in the COCO layout; flat is the symlink


def test_prepare_file_skips_escaping_names_without_reading_them(escape_case, tmp_path, monkeypatch):
    root, secret = escape_case
    names = ESCAPING[:-2] + [str(secret), "sub/../ok.png", "sub\\inner.png"]
    images = [{"id": i, "file_name": n} for i, n in enumerate(names, start=1)]
    anns = [{"id": i, "image_id": i, "caption": f"画像{i}"} for i in range(1, len(names) + 1)]
    captions = write_json(tmp_path / "mixed.json", {"images": images, "annotations": anns})
    from jpcap_helpers.data import images as data_images

    opened = []
    real_load = data_images.load_image
    monkeypatch.setattr(data_images, "load_image", lambda p, *a, **k: opened.append(Path(p)) or real_load(p, *a, **k))
    rep = D.prepare_file(captions, root, tmp_path / "out", progress=False)
    n_bad = len(names) - 2
    assert rep["images"]["skipped_by_reason"] == {"outside_images_root": n_bad}
    assert rep["images"]["kept"] == 2 and rep["captions"]["skipped_by_reason"] == {"image_skipped": n_bad}
    kept = D.load_split(tmp_path / "out" / "mixed.jsonl")
    assert [r.file_name for r in kept] == ["sub/../ok.png", "sub/inner.png"]
    assert opened and all(os.path.realpath(p).startswith(str(root.resolve()) + os.sep) for p in opened)
    assert sum("outside_images_root" in line for line in rep["problems"]) == n_bad
    skipped = {s["file_name"]: s for s in rep["skipped_images"]}
    assert "outside" in skipped["../outside/secret.png"]["detail"]


def test_prepare_dataset_skips_escaping_names(toy_root, tmp_path):
    train_json = toy_root / "stair_captions_v1.2_train.json"
    data = json.loads(train_json.read_text(encoding="utf-8"))
    outside = save_jpeg(tmp_path / "outside" / "secret.jpg")
    data["images"][0]["file_name"] = "../outside/secret.jpg"          # a valid image, one folder up
    data["images"][1]["file_name"] = str(outside)
    write_json(train_json, data)
    rep = D.prepare_dataset(toy_root, toy_root, tmp_path / "p", val_size=8, test_size=16, progress=False)
    assert rep["image_checks"]["skipped_by_reason"] == {"outside_images_root": 2}
    assert rep["image_checks"]["removed_per_split"]["train"] == 2
    assert {e["image_id"] for e in rep["image_checks"]["examples"]["outside_images_root"]} == {
        data["images"][0]["id"], data["images"][1]["id"]}
    assert len(D.load_split(tmp_path / "p" / "train.jsonl")) == 30 - 2


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Every awkward image we expect, generated with PIL; returns {name: path}."""
    d = tmp_path_factory.mktemp("odd")
    p = {}
    p["ok"] = save_jpeg(d / "ok.jpg")
    p["missing"] = d / "missing.jpg"
    p["empty"] = d / "empty.jpg"
    p["empty"].write_bytes(b"")
    good = noisy_jpeg_bytes()
    p["truncated"] = d / "truncated.jpg"
    p["truncated"].write_bytes(good[: len(good) // 2])
    p["text"] = d / "text.jpg"
    p["text"].write_text("this is not an image\n")
    p["wide"] = save_jpeg(d / "wide.jpg", size=(600, 2))            # 300:1
    p["tall_ok"] = save_jpeg(d / "tall_ok.jpg", size=(2, 200))      # 100:1 is accepted
    p["cmyk"] = d / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(p["cmyk"])   # red in CMYK
    p["gray"] = d / "gray.jpg"
    Image.new("L", (40, 30), 128).save(p["gray"])
    p["palette"] = d / "palette.png"
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    pal.paste(1, (0, 0, 10, 20))                                   # left half red, right half index 0
    pal.save(p["palette"], transparency=0)                          # index 0 (blue) transparent
    p["rgba"] = d / "rgba.png"
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((0, 200, 0, 255), (10, 0, 20, 20))
    rgba.save(p["rgba"])
    p["png_named_jpg"] = d / "png_named.jpg"
    Image.new("RGB", (30, 20), (1, 2, 3)).save(p["png_named_jpg"], "PNG")
    p["gray16"] = d / "gray16.png"
    Image.fromarray(np.full((10, 12), 65535, dtype=np.uint16)).save(p["gray16"])
    p["exif"] = d / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                                                # rotate 90 degrees to display
    Image.new("RGB", (40, 20), (10, 10, 200)).save(p["exif"], exif=exif)
    p["one"] = d / "one.png"
    Image.new("RGB", (1, 1), (5, 5, 5)).save(p["one"])
    p["large"] = d / "large.jpg"
    Image.new("RGB", (9000, 7000), (90, 160, 30)).save(p["large"], quality=75)
    p["large_png"] = d / "large.png"
    Image.new("RGB", (4000, 3000), (90, 160, 30)).save(p["large_png"], compress_level=1)
    return p


def test_check_image_reasons(odd_images):
    expected = {"ok": None, "missing": "missing", "empty": "empty", "truncated": "truncated",
                "text": "not_an_image", "wide": "aspect_ratio", "tall_ok": None, "cmyk": None, "gray": None,
                "palette": None, "rgba": None, "png_named_jpg": None, "gray16": None, "exif": None,
                "one": None}
    got = {name: D.check_image(odd_images[name], reject=processor_rejection) for name in expected}
    assert got == expected


def test_processor_rejection_follows_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    assert processor_rejection(300, 1) == "aspect_ratio"
    assert processor_rejection(1, 1) is None
    with pytest.raises(ValueError):          # the very function we rely on refuses it
        smart_resize(1, 300)


def test_load_image_modes_to_rgb(odd_images):
    cmyk = D.load_image(odd_images["cmyk"])
    assert cmyk.mode == "RGB" and cmyk.size == (40, 30)
    r, g, b = cmyk.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60
    gray = D.load_image(odd_images["gray"])
    assert gray.mode == "RGB" and len(set(gray.getpixel((5, 5)))) == 1
    pal = D.load_image(odd_images["palette"])
    assert pal.mode == "RGB"
    assert pal.getpixel((2, 5)) == (255, 0, 0) and pal.getpixel((15, 5)) == (255, 255, 255)  # transparent -> white
    rgba = D.load_image(odd_images["rgba"])
    assert rgba.getpixel((2, 5)) == (255, 255, 255) and rgba.getpixel((15, 5)) == (0, 200, 0)
    g16 = D.load_image(odd_images["gray16"])
    assert g16.mode == "RGB" and g16.getpixel((0, 0)) == (255, 255, 255)
    one = D.load_image(odd_images["one"])
    assert one.size == (1, 1) and one.mode == "RGB"
    assert D.load_image(odd_images["png_named_jpg"]).size == (30, 20)


def test_exif_orientation_applied(odd_images):
    with Image.open(odd_images["exif"]) as raw:
        assert raw.size == (40, 20)
    assert D.load_image(odd_images["exif"]).size == (20, 40)


def test_large_jpeg_is_decoded_downscaled(odd_images):
    im = D.load_image(odd_images["large"], max_side=1024)
    assert im.size == (1024, 796) and im.mode == "RGB"
    # 10 Mpx is less than the 63 Mpx of the file: only a reduced-scale decode (draft) fits.
    small = D.load_image(odd_images["large"], max_side=512, max_decode_pixels=10_000_000)
    assert max(small.size) == 512
    # A PNG cannot be decoded at reduced scale: over the limit it is refused, not loaded.
    with pytest.raises(D.ImageLoadError) as exc:
        D.load_image(odd_images["large_png"], max_side=512, max_decode_pixels=10_000_000)
    assert exc.value.reason == "too_large"
    assert D.check_image(odd_images["large_png"], max_side=512, max_decode_pixels=10_000_000) == "too_large"


def test_decompression_bomb_limit_is_caught(odd_images, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    # Pillow itself refuses both files at open (12 and 63 Mpx > 2 x limit).
    for name in ("large_png", "large"):
        with pytest.raises(Image.DecompressionBombError):
            Image.open(odd_images[name])
    # PNG: no reduced-scale decode -> skipped with a reason, no exception.
    assert D.check_image(odd_images["large_png"]) == "too_large"
    # JPEG: decoded at 1/8 scale (1125 x 875 < 1 Mpx) -> loaded, downscaled ...
    assert D.load_image(odd_images["large"], max_side=1024).size == (1024, 796)
    # ... but not when asked for full size.
    assert D.check_image(odd_images["large"], max_side=None) == "too_large"


# --------------------------------------------------------------------------- cleaning


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    from jpcap_helpers.models import train_tiny_tokenizer

    texts = ["犬が走っている。", "猫が寝ている。", "鳥が飛んでいる。", FULLWIDTH_CLEAN, "赤いボールがある。"] * 20
    tok = train_tiny_tokenizer(texts, vocab_size=400)
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return d


def test_clean_captions_counts_and_drops(messy_stair):
    records, _ = D.load_coco_captions(messy_stair[0])
    stats = D.clean_captions(records)
    assert [r.image_id for r in records] == [1, 2, 3, 5]
    assert records[1].captions == [FULLWIDTH_CLEAN]
    assert stats["captions_in"] == 5 and stats["captions_out"] == 4
    assert stats["dropped"] == {"empty_after_normalize": 1}
    assert stats["dropped_captions"] == [{"image_id": 2, "caption": "😀🎉", "reason": "empty_after_normalize"}]
    assert stats["normalize"]["emoji"] == 1 and stats["normalize"]["changed"] == 2
    assert stats["truncated"] == 0 and stats["tokenizer"] is None
    assert stats["examples"]["nfkc"][0]["after"] == FULLWIDTH_CLEAN


def test_clean_captions_drops_images_left_empty():
    records = [ImageRecord(1, "a.jpg", ["✨"]), ImageRecord(2, "b.jpg", ["ok"])]
    stats = D.clean_captions(records)
    assert [r.image_id for r in records] == [2]
    assert stats["images_dropped_no_captions"] == 1 and stats["images_dropped_ids"] == [1]


def test_clean_captions_truncates_with_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    long = "犬が走っている。" * 10
    records = [ImageRecord(1, "a.jpg", [long, "猫"])]
    stats = D.clean_captions(records, tokenizer=tok, max_caption_tokens=6)
    assert stats["truncated"] == 1 and stats["max_caption_tokens"] == 6
    short = records[0].captions[0]
    assert long.startswith(short) and 0 < len(tok(short, add_special_tokens=False)["input_ids"]) <= 6
    assert records[0].captions[1] == "猫"
    # A folder path works as well as a tokenizer object.
    records = [ImageRecord(1, "a.jpg", [long])]
    assert D.clean_captions(records, tokenizer=tiny_tokenizer_dir, max_caption_tokens=6)["truncated"] == 1


# --------------------------------------------------------------------------- splits


def synth(ids, prefix="train2014", text="説明"):
    return [ImageRecord(i, f"{prefix}/{coco_name(prefix, i)}", [f"{text}{i}", f"別の{text}{i}"]) for i in ids]


TRAIN = synth(range(1, 101))
VAL = synth(range(1001, 1101), "val2014")


def ids(recs):
    return [r.image_id for r in recs]


def test_splits_deterministic_disjoint_and_sized():
    a, info = D.make_splits(TRAIN, VAL, val_size=20, test_size=30, seed=0)
    b, _ = D.make_splits(list(reversed(TRAIN)), list(reversed(VAL)), val_size=20, test_size=30, seed=0)
    assert {k: ids(v) for k, v in a.items()} == {k: ids(v) for k, v in b.items()}   # input order irrelevant
    assert ids(a["train"]) == list(range(1, 101))
    assert len(a["val"]) == 20 and len(a["test"]) == 30
    assert not set(ids(a["val"])) & set(ids(a["test"]))
    assert set(ids(a["val"])) | set(ids(a["test"])) <= set(range(1001, 1101))
    assert ids(a["val"]) == sorted(ids(a["val"]))
    assert info["splits"]["test"]["hash"] == D.split_hash(a["test"]) and len(D.split_hash(a["test"])) == 16
    c, _ = D.make_splits(TRAIN, VAL, val_size=20, test_size=30, seed=1)
    assert ids(c["test"]) != ids(a["test"])
    d, _ = D.make_splits(TRAIN, VAL, val_size=40, test_size=30, seed=0)
    assert ids(d["test"]) == ids(a["test"])                   # test does not move with val_size
    with pytest.raises(ValueError, match="exceeds"):
        D.make_splits(TRAIN, VAL, val_size=80, test_size=30)


def test_subsets_are_nested_and_hash_tracks_content():
    small, _ = D.make_splits(TRAIN, VAL, val_size=20, test_size=30, train_subset=10, test_subset=5)
    big, _ = D.make_splits(TRAIN, VAL, val_size=20, test_size=30, train_subset=40, test_subset=15)
    assert len(small["train"]) == 10 and len(big["train"]) == 40 and len(small["test"]) == 5
    assert set(ids(small["train"])) < set(ids(big["train"]))
    assert set(ids(small["test"])) < set(ids(big["test"]))
    edited = [ImageRecord(r.image_id, r.file_name, list(r.captions)) for r in small["train"]]
    assert D.split_hash(edited) == D.split_hash(small["train"])
    edited[0].captions[0] += "。"
    assert D.split_hash(edited) != D.split_hash(small["train"])


def test_yj_leak_removed_and_reported():
    yj = synth([5, 6, 7, 1001, 1002, 5000], "train2014", text="YJ")
    splits, info = D.make_splits(TRAIN, VAL, val_size=20, test_size=30, yj_records=yj)
    assert ids(splits["yj_test"]) == [1001, 1002, 5000]
    assert info["yj"]["overlap_train_removed"] == 3 and info["yj"]["overlap_train_examples"] == [5, 6, 7]
    in_val_or_test = {1001, 1002} & set(ids(splits["val"]) + ids(splits["test"]))
    assert info["yj"]["overlap_val"] + info["yj"]["overlap_test"] == len(in_val_or_test)
    # With a training subset only the images actually trained on are removed; the pool overlap is reported.
    splits, info = D.make_splits(TRAIN, VAL, val_size=20, test_size=30, yj_records=yj, train_subset=10)
    train_ids = set(ids(splits["train"]))
    assert not train_ids & set(ids(splits["yj_test"]))
    assert info["yj"]["overlap_train_removed"] == len(train_ids & {5, 6, 7})
    assert info["yj"]["overlap_train_pool"] == 3


def test_karpathy_split_honoured(tmp_path):
    kimages = ([{"cocoid": i, "split": "train"} for i in range(1, 51)]
               + [{"cocoid": i, "split": "restval"} for i in range(1001, 1011)]
               + [{"cocoid": i, "split": "val"} for i in range(1011, 1021)]
               + [{"cocoid": i, "split": "test"} for i in list(range(51, 61)) + [99999]])
    kp = write_json(tmp_path / "dataset_coco.json", {"images": kimages, "dataset": "coco"})
    splits, info = D.make_splits(TRAIN, VAL, karpathy_path=kp)
    assert ids(splits["train"]) == list(range(1, 51)) + list(range(1001, 1011))
    assert ids(splits["val"]) == list(range(1011, 1021))
    assert ids(splits["test"]) == list(range(51, 61))
    assert info["method"] == "karpathy"
    assert info["not_in_karpathy"] == 200 - 80
    assert info["karpathy_without_captions"] == {"test": 1}
    bad = write_json(tmp_path / "bad_karpathy.json", {"images": [{"cocoid": 1, "split": "holdout"}]})
    with pytest.raises(DataError, match="bad_karpathy.json"):
        D.make_splits(TRAIN, VAL, karpathy_path=bad)


# --------------------------------------------------------------------------- prepare_dataset


@pytest.fixture
def toy_root(tmp_path):
    root = tmp_path / "jp-shapes"
    D.generate_jp_shapes(root, n_train=30, n_val=24, n_yj=12, image_sizes=((56, 56), (70, 56)))
    return root


def test_prepare_dataset_on_toy_data(toy_root, tmp_path):
    # Damage one STAIR-val image so that the check has something to find.
    val_json = json.loads((toy_root / "stair_captions_v1.2_val.json").read_text(encoding="utf-8"))
    victim = val_json["images"][0]
    (toy_root / "val2014" / victim["file_name"]).write_bytes(b"")
    out = tmp_path / "processed"
    rep = D.prepare_dataset(toy_root, toy_root, out, yj_path=toy_root / "yjcaptions26k_clean.json",
                            val_size=8, test_size=16, seed=0, progress=False)

    splits = {name: D.load_split(out / f"{name}.jsonl") for name in D.SPLIT_NAMES}
    assert len(splits["train"]) == 30
    lost = [name for name in ("val", "test") if rep["image_checks"]["removed_per_split"][name]]
    assert rep["image_checks"]["skipped_by_reason"] == {"empty": 1}
    assert len(lost) == 1 and len(splits["val"]) + len(splits["test"]) == 8 + 16 - 1
    assert rep["image_checks"]["examples"]["empty"][0]["image_id"] == victim["id"]
    for name, recs in splits.items():
        assert rep["splits"][name] == {"images": len(recs), "captions": sum(len(r.captions) for r in recs),
                                       "hash": D.split_hash(recs)}
        assert all(r.captions and (toy_root / r.file_name).exists() for r in recs)
    train_ids = set(ids(splits["train"]))
    assert not train_ids & set(ids(splits["yj_test"]))
    assert rep["split_info"]["yj"]["overlap_train_removed"] > 0       # jp-shapes reuses train images
    assert len(splits["yj_test"]) == (12 - rep["split_info"]["yj"]["overlap_train_removed"]
                                      - rep["image_checks"]["removed_per_split"]["yj_test"])

    pairs = [json.loads(line) for line in (out / "train_pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(pairs) == rep["splits"]["train"]["captions"]
    assert set(pairs[0]) == {"image_id", "file_name", "caption"}
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == rep
    assert rep["inputs"]["stair_train"]["sha256"] and rep["load"]["yj"]["n_records"] == 12

    from datasets import load_dataset
    ds = load_dataset("json", data_files=str(out / "train_pairs.jsonl"), split="train",
                      cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == len(pairs) and ds[0]["caption"] == pairs[0]["caption"]

    # Same inputs, same seed: same splits. No YJ now: the stale yj_test.jsonl goes.
    rep2 = D.prepare_dataset(toy_root, toy_root, out, val_size=8, test_size=16, seed=0, check_images=False,
                             progress=False)
    assert rep2["splits"]["train"]["hash"] == rep["splits"]["train"]["hash"]
    assert not (out / "yj_test.jsonl").exists() and rep2["removed_stale_file"] == "yj_test.jsonl"


def test_prepare_dataset_is_atomic(toy_root, tmp_path, monkeypatch):
    out = tmp_path / "processed"
    D.prepare_dataset(toy_root, toy_root, out, val_size=8, test_size=16, progress=False, check_images=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_pairs(records):
        yield {"image_id": 1, "file_name": "x", "caption": "y"}
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(data_prepare, "_pairs", broken_pairs)
    with pytest.raises(RuntimeError, match="simulated"):
        D.prepare_dataset(toy_root, toy_root, out, val_size=8, test_size=16, seed=3, progress=False,
                          check_images=False)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before)                                   # no temp file left behind
    assert after["train_pairs.jsonl"] == before["train_pairs.jsonl"]   # old file intact, not half-written
    assert after["report.json"] == before["report.json"]               # report is written last


def test_load_split_errors(tmp_path):
    p = tmp_path / "val.jsonl"
    p.write_text('{"image_id": 1, "file_name": "a.jpg", "captions": ["x"]}\n{"image_id": 2\n', encoding="utf-8")
    with pytest.raises(DataError, match="val.jsonl: line 2"):
        D.load_split(p)
    p.write_text('{"image_id": 1, "file_name": "a.jpg"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="record 1 has no key 'captions'"):
        D.load_split(p)


# --------------------------------------------------------------------------- CLI


def prepare_cli(argv) -> int:
    """``jpcap prepare ARGV`` through the real command line."""
    return jpcap_main(["prepare", *argv])


@pytest.fixture
def cli_case(messy_stair, tmp_path):
    """messy_stair plus bad image files: image 3 truncated, image 5 missing."""
    path, root = messy_stair
    good = noisy_jpeg_bytes()
    (root / "train2014" / coco_name("train2014", 3)).write_bytes(good[: len(good) // 2])
    (root / "train2014" / coco_name("train2014", 5)).unlink()
    return path, root


def test_cli_prepare_counts_every_skip(cli_case, tmp_path, capsys):
    path, root = cli_case
    out = tmp_path / "out"
    rc = prepare_cli(["--captions", str(path), "--images", str(root), "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "stair_captions_v1.2_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [{"image_id": 1, "file_name": "train2014/" + coco_name("train2014", 1), "captions": ["犬が走っている。"]},
                    {"image_id": 2, "file_name": "train2014/" + coco_name("train2014", 2), "captions": [FULLWIDTH_CLEAN]}]
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["images"] == {"in_file": 5, "kept": 2, "skipped": 3, "duplicate_entries": 1,
                             "skipped_by_reason": {"missing": 1, "no_captions": 1, "truncated": 1}}
    assert rep["captions"]["in_file"] == 11 and rep["captions"]["kept"] == 2 and rep["captions"]["skipped"] == 9
    assert rep["captions"]["skipped_by_reason"] == {
        "caption_empty": 2, "caption_not_string": 1, "caption_null": 1, "duplicate_annotation_id": 1,
        "empty_after_normalize": 1, "image_skipped": 2, "unknown_image_id": 1}
    assert sum(rep["captions"]["skipped_by_reason"].values()) == rep["captions"]["skipped"]
    assert {(s["image_id"], s["reason"]) for s in rep["skipped_images"]} == {(3, "truncated"), (4, "no_captions"),
                                                                            (5, "missing")}
    assert len(rep["skipped_captions"]) == 7
    assert "stair_captions_v1.2_train.jsonl" in capsys.readouterr().out


def test_cli_strict_lists_problems(cli_case, tmp_path, capsys):
    path, root = cli_case
    rc = prepare_cli(["--captions", str(path), "--images", str(root), "--out", str(tmp_path / "o"),
                      "--strict", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    for needle in ("caption 2 (image 1): caption_null", "caption 7 (image 999): unknown_image_id",
                   "empty_after_normalize", "image 3 train2014/", ": truncated", "image 5", ": missing",
                   "image 4: no_captions", "duplicate entry"):
        assert needle in err
    assert "11 problem(s)" in err


def test_cli_clean_input_strict_passes_with_flat_folder_and_tokenizer(tmp_path, tiny_tokenizer_dir):
    flat = tmp_path / "imgs"
    for i in (1, 2):
        save_jpeg(flat / coco_name("val2014", i))               # images directly in the folder
    path = write_json(tmp_path / "stair_captions_v1.2_val.json", {
        "images": [{"id": i, "file_name": coco_name("val2014", i)} for i in (1, 2)],
        "annotations": [{"id": 1, "image_id": 1, "caption": "犬が走っている。" * 10},
                        {"id": 2, "image_id": 2, "caption": "猫"}]})
    out = tmp_path / "out"
    rc = prepare_cli(["--captions", str(path), "--images", str(flat), "--out", str(out), "--strict",
                      "--tokenizer", str(tiny_tokenizer_dir), "--max-caption-tokens", "6", "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["layout"] == {"flat": 2} and rep["images"]["kept"] == 2 and rep["problems"] == []
    assert rep["cleaning"]["truncated"] == 1
    rows = D.load_split(out / "stair_captions_v1.2_val.jsonl")
    assert rows[0].file_name == "val2014/" + coco_name("val2014", 1)
    assert D.resolve_image_path(flat, rows[0].file_name) == flat / coco_name("val2014", 1)


@pytest.mark.parametrize("case", ["bad_json", "no_images_dir", "no_captions_file", "bad_tokenizer"])
def test_cli_errors_exit_2_without_traceback(tmp_path, capsys, case):
    images = tmp_path / "imgs"
    images.mkdir()
    captions = tmp_path / "caps.json"
    captions.write_text('{"images": [', encoding="utf-8")
    argv = ["--captions", str(captions), "--images", str(images), "--out", str(tmp_path / "o")]
    if case == "no_images_dir":
        write_json(captions, {"images": [], "annotations": []})
        argv[3] = str(tmp_path / "nowhere")
        needle = "nowhere: images folder not found"
    elif case == "no_captions_file":
        argv[1] = str(tmp_path / "missing.json")
        needle = "missing.json: captions file not found"
    elif case == "bad_tokenizer":
        write_json(captions, {"images": [], "annotations": []})
        argv += ["--tokenizer", str(tmp_path / "no_tok")]
        needle = "no_tok: tokenizer folder not found"
    else:
        needle = "caps.json: not valid JSON"
    assert prepare_cli(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err

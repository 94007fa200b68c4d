"""Caption your own photo (analysis/your_photo) on the offline tiny model."""
from __future__ import annotations

from jpcap_helpers.analysis import your_photo
from jpcap_helpers.params import Params


def test_caption_photos_with_a_toy_photo_and_a_missing_one(toy_root, tmp_path):
    params = Params.from_dict({
        "run": {"name": "photo", "output_dir": str(tmp_path / "out")}, "data": {"root": str(toy_root)},
        "model": {"precision": "fp32", "min_pixels": 3136, "max_pixels": 12544, "models_dir": str(tmp_path / "models")},
        "generation": {"batch_size": 2, "max_new_tokens": 6, "constraints": {"ban_scripts": ["latin"]}}})
    photo = your_photo.toy_photo(tmp_path / "mine.jpg", seed=1)
    assert photo.read_bytes()[:2] == b"\xff\xd8"
    table = your_photo.caption_photos(params, [photo, tmp_path / "missing.jpg"], adapter=tmp_path / "no-adapter")
    assert list(table["photo"]) == [str(photo), str(tmp_path / "missing.jpg")]
    assert [c for c in table.columns if c != "photo"] == [
        "tiny-qwen2-vl: caption", "tiny-qwen2-vl: flags", "tiny-qwen2-vl: gendered terms", "tiny-qwen2-vl: error"]
    assert table.loc[0, "tiny-qwen2-vl: error"] == "" and table.loc[1, "tiny-qwen2-vl: error"]
    assert not any(c.isascii() and c.isalpha() for c in table.loc[0, "tiny-qwen2-vl: caption"])

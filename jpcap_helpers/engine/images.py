"""Images for the caption engine: loading (as the data stage does), image sizes from the file
headers, and the key that groups images of equal visual-token count into batches."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..data import DEFAULT_MAX_SIDE, load_image, resolve_image_path  # EXIF, RGB, size cap; COCO root or flat

__all__ = ["IMAGE_SUFFIXES", "resolve_image", "folder_records", "load_image_for_model", "load_image_tensor",
           "image_size", "group_key"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def resolve_image(images_dir: str | Path, file_name: str) -> Path:
    """COCO root or flat folder: the same resolution as the data stage."""
    return Path(resolve_image_path(Path(images_dir), file_name))


def folder_records(folder: str | Path) -> list[dict]:
    """One record per image file of ``folder`` and its subfolders (symlinks not followed), sorted by
    path: ``file_name`` relative to the folder and an ``image_id`` derived from that name (stable when
    files are added or removed, so a resumed run skips exactly the images it has captioned)."""
    import hashlib

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of images (--images DIR)")
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.is_symlink())
    if not names:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [{"image_id": int(hashlib.sha1(n.encode("utf-8")).hexdigest()[:12], 16), "file_name": n} for n in names]


def load_image_for_model(path: str | Path, size: Optional[tuple[int, int]] = None) -> Any:
    """An RGB PIL image with EXIF orientation applied and very large images capped (``data.load_image``);
    with ``size`` = (height, width) resized to exactly that (bicubic, as the Qwen processors resize):
    a canonical grid of ``generation.grid_buckets`` (:mod:`.grids`)."""
    image = load_image(path)
    if size is not None and image.size != (size[1], size[0]):
        from PIL import Image

        image = image.resize((int(size[1]), int(size[0])), Image.Resampling.BICUBIC)
    return image


def load_image_tensor(path: str | Path, pin: bool = True, size: Optional[tuple[int, int]] = None) -> Any:
    """The same image as a (3, H, W) uint8 tensor, in pinned memory for a fast copy to the GPU (the
    image processor converts a PIL image to exactly this; doing it in the loader threads keeps that
    work off the thread that drives the GPU)."""
    import numpy as np
    import torch

    image = load_image_for_model(path, size)
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return tensor.pin_memory() if pin else tensor


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) as the model will see it (EXIF rotation applied), from the header only."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if max(width, height) > DEFAULT_MAX_SIDE:
        scale = DEFAULT_MAX_SIDE / max(width, height)  # load_image thumbnails to max_side (approximately)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    return height, width


def group_key(processor: Any, height: int, width: int) -> tuple[int, ...]:
    """Sort key grouping images whose prompts get the same number of visual tokens: for the Qwen
    image processors the resized grid (smart_resize), else a fixed count (PaliGemma) or nothing."""
    ip = getattr(processor, "image_processor", None)
    patch = getattr(ip, "patch_size", None)
    merge = getattr(ip, "merge_size", None)
    size = getattr(ip, "size", None) or {}
    if patch and merge and hasattr(ip, "get_number_of_image_patches"):
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        factor = patch * merge
        min_pixels = size.get("shortest_edge", size.get("min_pixels", 56 * 56))
        max_pixels = size.get("longest_edge", size.get("max_pixels", 28 * 28 * 1280))
        h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return ((h // patch) * (w // patch) // (merge * merge), h, w)
    seq = getattr(processor, "image_seq_length", None)
    return (int(seq),) if seq else (0,)

"""Image files: safe lookup under the images folder, decoding (EXIF, RGB, size cap) and the checks.

Every image path is made by :func:`resolve_image_path`, the one place that decides whether a
``file_name`` from a captions file may be opened: the path, symlinks resolved, must stay inside the
images folder, else :class:`ImageLoadError` with reason ``outside_images_root`` (never read).
"""
from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .records import ImageLoadError

DEFAULT_MAX_SIDE = 1024     # load_image's default: the processor downsizes further (max_pixels)
OUTSIDE_IMAGES_ROOT = "outside_images_root"
# Image skip reasons (resolve_image_path / load_image / check_image; "aspect_ratio" comes from the size rule).
IMAGE_SKIP_REASONS = (OUTSIDE_IMAGES_ROOT, "missing", "empty", "not_an_image", "truncated", "corrupt",
                      "too_large", "unsupported_mode", "aspect_ratio")

# A model's image size rule: (width, height) as loaded -> skip reason or None
# (e.g. models.image_rules.processor_rejection, Qwen2-VL's aspect-ratio limit).
SizeRule = Callable[[int, int], Optional[str]]
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def safe_image_path(images_root: str | os.PathLike, file_name: str) -> Path:
    """``images_root / file_name`` (backslashes count as separators), refused unless it stays inside.

    An absolute name (``/etc/passwd``, ``C:\\x.png``, ``\\\\server\\share``), a NUL byte, or a name
    whose path leaves ``images_root`` once ``..`` and symlinks are resolved (``../x.png``,
    ``sub/../../x.png``, a symlink inside pointing outside) raises :class:`ImageLoadError` with reason
    ``outside_images_root``; ``sub/../ok.png`` is fine. The file need not exist.
    """
    root = Path(images_root)
    name = str(file_name).replace("\\", "/")
    if "\0" in name:
        raise ImageLoadError(OUTSIDE_IMAGES_ROOT, file_name, "NUL byte in the name")
    if name.startswith("/") or _DRIVE_RE.match(name):
        raise ImageLoadError(OUTSIDE_IMAGES_ROOT, file_name, f"an absolute path, not one relative to {root}")
    path = root / name
    root_real, real = os.path.realpath(root), os.path.realpath(path)
    if real != root_real and not real.startswith(root_real.rstrip(os.sep) + os.sep):
        raise ImageLoadError(OUTSIDE_IMAGES_ROOT, file_name, f"resolves to {real}, outside {root_real}")
    return path


def resolve_image_path(images_root: str | os.PathLike, file_name: str) -> Path:
    """The image file for ``file_name`` under ``images_root``: the COCO root (holding ``train2014/``)
    or a folder holding the images directly. Returns the COCO-root path when neither exists.

    Both candidates go through :func:`safe_image_path`: a name that leaves ``images_root`` raises
    :class:`ImageLoadError` (``outside_images_root``) and is never opened.
    """
    full = safe_image_path(images_root, file_name)
    if full.exists():
        return full
    base = str(file_name).replace("\\", "/").rsplit("/", 1)[-1]
    flat = Path(images_root) / base
    if flat != full and flat.exists():
        try:
            return safe_image_path(images_root, base)
        except ImageLoadError as e:
            raise ImageLoadError(e.reason, file_name, f"{flat}: {e.detail}") from None
    return full


def _open_image(path: Path) -> Image.Image:
    """Open lazily. JPEGs bypass Pillow's pixel-count check at open (they decode at reduced scale
    via ``draft``; :func:`load_image` applies its own limit to the decoded size)."""
    with open(path, "rb") as fh:
        head = fh.read(3)
    if head == b"\xff\xd8\xff":
        from PIL import JpegImagePlugin
        try:
            return JpegImagePlugin.JpegImageFile(path)
        except Exception:  # noqa: BLE001 - let Image.open classify it below
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy: alpha (RGBA/LA/PA, palette or tRNS transparency) composited on white, CMYK/L/1/P
    converted, 16-bit/float greyscale rescaled to 8 bits."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    if mode.startswith("I") or mode == "F":
        import numpy as np

        arr = np.asarray(im).astype(np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255:
            arr = arr * (255.0 / 65535.0)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike, max_side: int | None = DEFAULT_MAX_SIDE, *,
               max_decode_pixels: int | None = None) -> Image.Image:
    """Load an image as RGB with its EXIF orientation applied and its longer side at most ``max_side``.

    JPEGs are decoded at reduced scale (``Image.draft``) before the final ``thumbnail``, so a huge
    photo never materialises at full size. Images whose *decoded* size exceeds
    ``max_decode_pixels`` (default: Pillow's ``Image.MAX_IMAGE_PIXELS``, its decompression-bomb
    threshold) are refused as ``too_large``. Raises :class:`ImageLoadError` with a reason.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError("missing", path)
    if not path.is_file():
        raise ImageLoadError("not_an_image", path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageLoadError("empty", path)
    limit = max_decode_pixels if max_decode_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        im = _open_image(path)
    except UnidentifiedImageError:
        raise ImageLoadError("not_an_image", path) from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError("too_large", path, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError("corrupt", path, f"{type(e).__name__}: {e}") from None
    try:
        with im:
            width, height = im.size
            if max_side and max(width, height) > max_side and im.format in ("JPEG", "MPO"):
                scale = max_side / max(width, height)
                im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
            if limit and im.size[0] * im.size[1] > limit:
                raise ImageLoadError("too_large", path, f"{width}x{height}, decodes to {im.size[0]}x{im.size[1]} "
                                     f"> {limit} pixels")
            im.load()
            try:
                out = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - unreadable EXIF: keep the pixels as stored
                out = im.copy()
            if out is im or out is None:
                out = im.copy()
        try:
            out = _to_rgb(out)
        except (ValueError, OSError) as e:
            raise ImageLoadError("unsupported_mode", path, f"{out.mode}: {e}") from None
        if max_side and max(out.size) > max_side:
            out.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        return out
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError("too_large", path, str(e)) from None
    except OSError as e:
        msg = str(e)
        reason = "truncated" if ("truncated" in msg or "broken data stream" in msg) else "corrupt"
        raise ImageLoadError(reason, path, msg) from None
    except (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as e:
        raise ImageLoadError("corrupt", path, f"{type(e).__name__}: {e}") from None


def image_problem(path: str | os.PathLike, max_side: int | None = DEFAULT_MAX_SIDE,
                  max_decode_pixels: int | None = None, reject: SizeRule | None = None) -> tuple[str | None, str]:
    """(skip reason or None, detail) for one image file; ``reject`` judges the size as loaded."""
    try:
        im = load_image(path, max_side=max_side, max_decode_pixels=max_decode_pixels)
    except ImageLoadError as e:
        return e.reason, e.detail
    width, height = im.size
    reason = reject(width, height) if reject is not None else None
    if reason:
        return reason, f"{width}x{height} as loaded (ratio {max(width, height) / min(width, height):.1f})"
    return None, ""


def check_image(path: str | os.PathLike, max_side: int | None = DEFAULT_MAX_SIDE, *,
                max_decode_pixels: int | None = None, reject: SizeRule | None = None) -> str | None:
    """Why the image at ``path`` cannot be used (one of :data:`IMAGE_SKIP_REASONS`), or None.

    Decodes the whole file exactly as :func:`load_image` will (so truncation is caught) and asks
    ``reject`` (the model's rule, e.g. ``models.image_rules.processor_rejection``) about the size as loaded;
    use the same ``max_side`` for training.
    """
    return image_problem(path, max_side, max_decode_pixels, reject)[0]


def check_many(paths: Sequence[Path], *, max_side: int | None, workers: int | None, progress: bool,
               reject: SizeRule | None = None, desc: str = "checking images") -> list[tuple[str | None, str]]:
    """:func:`image_problem` for many files in a thread pool (decoding releases the GIL)."""
    workers = workers or min(8, os.cpu_count() or 2)
    results: list[tuple[str | None, str]] = [(None, "")] * len(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        futures = {pool.submit(image_problem, p, max_side, None, reject): i for i, p in enumerate(paths)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results


"""Data stage: STAIR / YJ captions and COCO images into processed splits (see docs/data.md).

One in-memory form for every source: :class:`ImageRecord` (one COCO image, its captions and its
``file_name`` relative to the images folder). The real STAIR/YJ files and the offline jp-shapes set
(:mod:`.toy`) share the layout, so the same code reads both. Bad input never crashes a run half-way:
a malformed file raises one :class:`DataError` naming the file and the fix; a bad caption or image
is dropped and counted with its reason (an image name leaving the images folder:
``outside_images_root``).

Files: ``records`` (ImageRecord, errors, file names), ``coco`` (caption files), ``images`` (safe
lookup, decoding, checks), ``cleaning``, ``splits``, ``prepare``, ``download``, ``toy``, ``tables``.
"""
from .cleaning import clean_captions
from .coco import LoadReport, load_coco_captions
from .download import (
                       COCO_BASE_URL,
                       COCO_ZIP_URLS,
                       STAIR_URL,
                       YJ_URL,
                       download_coco_images,
                       download_file,
                       download_stair,
                       download_yj,
                       fetch_raw,
)
from .images import (
                       DEFAULT_MAX_SIDE,
                       IMAGE_SKIP_REASONS,
                       OUTSIDE_IMAGES_ROOT,
                       SizeRule,
                       check_image,
                       load_image,
                       resolve_image_path,
                       safe_image_path,
)
from .prepare import prepare_dataset, prepare_file, prepare_from_params
from .records import (
                       SPLIT_NAMES,
                       STAIR_TRAIN_FILE,
                       STAIR_VAL_FILE,
                       YJ_FILE,
                       DataError,
                       DownloadError,
                       ImageLoadError,
                       ImageRecord,
)
from .splits import load_split, make_splits, split_file_names, split_hash
from .tables import caption_statistics, report_tables, sample_items
from .toy import PRETRAIN_TEMPLATES, all_caption_texts, constant_caption, generate_jp_shapes, pretrain_items

__all__ = [
    # records and errors
    "ImageRecord", "LoadReport", "DataError", "ImageLoadError", "DownloadError",
    "STAIR_TRAIN_FILE", "STAIR_VAL_FILE", "YJ_FILE", "SPLIT_NAMES",
    # captions, images, cleaning, splits
    "load_coco_captions", "clean_captions",
    "DEFAULT_MAX_SIDE", "IMAGE_SKIP_REASONS", "OUTSIDE_IMAGES_ROOT", "safe_image_path", "resolve_image_path",
    "load_image", "check_image", "SizeRule",
    "make_splits", "split_hash", "load_split", "split_file_names",
    # prepare, notebook 01
    "prepare_dataset", "prepare_file", "prepare_from_params", "fetch_raw",
    "report_tables", "caption_statistics", "sample_items",
    # downloads
    "STAIR_URL", "YJ_URL", "COCO_BASE_URL", "COCO_ZIP_URLS",
    "download_file", "download_stair", "download_yj", "download_coco_images",
    # jp-shapes
    "generate_jp_shapes", "all_caption_texts", "constant_caption", "PRETRAIN_TEMPLATES", "pretrain_items",
]

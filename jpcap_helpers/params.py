"""The one params schema: typed sections with defaults and ranges, loaded from YAML (or a dict) and
validated before any model or data loads. Documented key by key in docs/params.md (a test keeps them in
sync). This module does no I/O beyond reading the file and writing the resolved copy.

One API everywhere: :func:`load_params` (file), :meth:`Params.from_dict`, :meth:`Params.with_overrides`
(``{"train.lora_rank": 8}`` or ``["train.lora_rank=8"]``), :meth:`Params.fingerprint`.

Relative paths resolve against the *project folder* (the parent of the ``params/`` folder holding the
file, or the file's own folder elsewhere); with ``run.persist_dir`` set they resolve inside that folder
instead, so everything later notebooks and sessions need lives there (Colab: a Drive folder).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .io import atomic_write_text


class ParamsError(ValueError):
    """A params file is wrong; the message names the file and the key."""


def _f(default: Any = None, *, factory: Any = None, ge: Optional[float] = None, gt: Optional[float] = None,
       le: Optional[float] = None, lt: Optional[float] = None, path: bool = False, must_exist: bool = False):
    """A schema field with an optional numeric range (checked for the value and each list item)."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if path:
        meta.update(path=True, must_exist=must_exist)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunParams:
    name: str = "default"                 # run folder name under output_dir
    output_dir: str = _f("outputs", path=True)
    seed: int = _f(0, ge=0)
    mount_drive: bool = False             # Colab: mount Google Drive before using persist_dir
    persist_dir: Optional[str] = None     # everything later notebooks/sessions need lives here
    model_cache: Literal["persist", "local"] = "persist"  # HF model downloads: in persist_dir, or the runtime's disk
    cpu_threads: Optional[int] = _f(None, ge=1)  # torch CPU threads (torch.set_num_threads); None: torch's default


@dataclass
class ToyDataParams:
    n_train: int = _f(480, ge=1)          # jp-shapes images standing in for STAIR train
    n_val: int = _f(160, ge=1)            # images standing in for STAIR val (carved into val/test)
    n_yj: int = _f(80, ge=0)              # images with YJ-style captions (some reuse train images)
    yj_train_overlap: float = _f(0.4, ge=0, le=1)
    image_sizes: list[list[int]] = _f(factory=lambda: [[112, 112], [140, 112], [112, 140], [168, 126]])
    seed: int = _f(0, ge=0)


@dataclass
class DataParams:
    source: Literal["jp-shapes", "stair"] = "jp-shapes"
    root: str = _f("data/jp-shapes", path=True)       # STAIR/YJ json files live here
    images_dir: Optional[str] = _f(None, path=True)   # COCO root holding train2014/ val2014/ (default: root)
    processed_dir: Optional[str] = _f(None, path=True)  # default: <root>/processed
    download: bool = False                # stair: fetch STAIR, YJ and the needed COCO images
    use_yj: bool = True
    karpathy_json: Optional[str] = _f(None, path=True, must_exist=True)
    val_size: int = _f(5000, ge=1)
    test_size: int = _f(5000, ge=1)
    train_subset: Optional[int] = _f(None, ge=1)
    val_subset: Optional[int] = _f(None, ge=1)
    test_subset: Optional[int] = _f(None, ge=1)
    yj_subset: Optional[int] = _f(None, ge=1)
    max_caption_tokens: int = _f(64, ge=1, le=4096)
    toy: ToyDataParams = _f(factory=ToyDataParams)


@dataclass
class TinyModelParams:
    """The offline tiny Qwen2-VL (real transformers classes): architecture, then its optional pretraining
    on another captioning task of the toy world (``pretrain_steps`` 0 = random init)."""
    hidden_size: int = _f(128, ge=8)
    intermediate_size: int = _f(256, ge=8)
    num_hidden_layers: int = _f(4, ge=1)
    num_attention_heads: int = _f(4, ge=1)
    num_key_value_heads: int = _f(2, ge=1)
    vision_depth: int = _f(2, ge=1)
    vision_embed_dim: int = _f(64, ge=8)
    vision_num_heads: int = _f(4, ge=1)
    tokenizer_vocab_size: int = _f(800, ge=300)
    seed: int = _f(0, ge=0)
    pretrain_steps: int = _f(0, ge=0)                 # 0: random init; > 0: pretrained base (docs/models.md)
    pretrain_images: int = _f(600, ge=1)              # fresh scenes (2 captions each), none from jp-shapes
    pretrain_lr: float = _f(2e-3, gt=0, le=1)
    pretrain_batch_size: int = _f(16, ge=1, le=4096)


@dataclass
class ModelParams:
    name: str = "tiny-qwen2-vl"           # a registry key (docs/models.md) or a local folder
    revision: Optional[str] = None        # overrides the registry's pinned revision
    trust_remote_code: Union[bool, list[str]] = False  # per-model opt-in to run hub code (pinned env):
                                          # registry keys / hub ids, "key@commit" pins it; true = model.name only
    loads: Literal["auto", "pinned_env"] = "auto"  # pinned_env: models with a pinned recipe run there
    allow_unpinned_remote_code: bool = False  # remote code without a pinned revision (explicit risk)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    load_in_4bit: bool = False            # THE 4-bit switch: QLoRA training and 4-bit captioning
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    compile: bool = True                  # regional torch.compile on GPUs of compute capability ≥ 8.0
    compile_tuning: Literal["off", "training", "all"] = "training"  # compiled kernels' launch configs tuned on
                                          # first use: for training; "all": captioning too (docs/params.md)
    min_pixels: int = _f(56 * 56, ge=28 * 28)
    max_pixels: int = _f(448 * 448, ge=28 * 28, le=4096 * 4096)
    models_dir: str = _f("outputs/models", path=True)  # where the tiny model is built
    tiny: TinyModelParams = _f(factory=TinyModelParams)


@dataclass
class ConstraintParams:
    """Constrained decoding (engine/constraints.py); every default is off."""
    ban_scripts: list[Literal["latin", "hangul", "cyrillic", "greek", "thai", "arabic"]] = _f(factory=list)
    word_list: Literal["none", "gendered"] = "none"   # gendered: the male/female terms of the gendered flag
    ban_words: list[str] = _f(factory=list)           # further terms to ban (or penalise)
    word_penalty: Optional[float] = _f(None, gt=0, le=1000)  # null: ban (-inf); a number: subtract it
    no_repeat_ngram_size: int = _f(0, ge=0, le=16)    # 0: off


@dataclass
class GenerationParams:
    batch_size: int = _f(16, ge=1, le=4096)
    max_new_tokens: int = _f(40, ge=1, le=1024)
    num_beams: int = _f(1, ge=1, le=16)
    prompt: Optional[str] = None          # None: the model's registry prompt
    decoder: Literal["auto", "hf"] = "auto"  # auto: static-cache greedy decoder where supported
    grid_buckets: int = _f(0, ge=0, le=64)  # K > 0: images moved to K canonical visual grids; 0: off
    warmup: bool = False                  # one blank batch per (grid, batch bucket) before the timed run
    merge_qlora_adapter: bool = True      # adapter trained on a 4-bit base: dequantize the base, merge the adapter
    fp8: Literal["off", "language", "all"] = "off"  # FP8 products for captioning (not exact; GPUs of capability ≥ 8.9)
    constraints: ConstraintParams = _f(factory=ConstraintParams)


@dataclass
class ZeroShotParams:
    models: list[str] = _f(factory=lambda: ["tiny-qwen2-vl"])
    splits: list[str] = _f(factory=lambda: ["test", "yj_test"])
    max_images: Optional[int] = _f(None, ge=1)   # per split; None = all


@dataclass
class TrainParams:
    lora_rank: int = _f(32, ge=1, le=1024)
    lora_alpha: int = _f(32, ge=1)
    lora_dropout: float = _f(0.05, ge=0, lt=1)
    top_k_layers: Union[int, Literal["all"]] = _f(6, ge=1)
    projector: Literal["trainable", "frozen"] = "trainable"
    learning_rate: float = _f(2e-4, gt=0, le=1)
    weight_decay: float = _f(0.0, ge=0, le=1)
    warmup_ratio: float = _f(0.03, ge=0, lt=1)
    epochs: float = _f(3.0, gt=0, le=1000)
    max_steps: Optional[int] = _f(None, ge=1)
    micro_batch_size: int = _f(8, ge=1, le=4096)
    effective_batch_size: int = _f(16, ge=1, le=65536)
    gradient_checkpointing: bool = True
    max_grad_norm: float = _f(1.0, gt=0)
    label_smoothing: float = _f(0.0, ge=0, lt=1)   # of the caption loss; 0: off (validation loss never smoothed)
    pack_captions: bool = False           # one packed sample per image: its captions share one image+prompt prefix
    captions_per_image: int = _f(0, ge=0, le=1000)   # with pack_captions: captions per packed sample (0: all)
    group_by_grid: bool = False           # micro-batches grouped by visual grid within shuffled windows
    cudagraphs: bool = False              # compiled language layers replay as CUDA graphs, one per batch shape (opt-in:
                                          # docs/training.md "CUDA graphs"; no validation, grouped grids)
    eval_every: int = _f(200, ge=0)       # optimizer steps between validations (0: off)
    eval_images: int = _f(200, ge=0)
    save_every: int = _f(200, ge=0)       # 0: only the final adapter, no checkpoints
    merge_adapter: bool = False


@dataclass
class EvaluateParams:
    splits: list[str] = _f(factory=lambda: ["test", "yj_test"])
    max_images: Optional[int] = _f(None, ge=1)   # per split, when captioning the fine-tuned model
    bootstrap_samples: int = _f(1000, ge=100, le=1_000_000)
    confidence: float = _f(0.95, gt=0, lt=1)
    seed: int = _f(0, ge=0)


@dataclass
class AblationParams:
    mode: Literal["one_factor", "grid"] = "one_factor"
    lora_rank: list[int] = _f(factory=lambda: [8, 16, 32, 64], ge=1, le=1024)
    top_k_layers: list[Union[int, Literal["all"]]] = _f(factory=lambda: [2, 6, 12, "all"], ge=1)
    projector: list[Literal["trainable", "frozen"]] = _f(factory=lambda: ["trainable", "frozen"])
    model: list[str] = _f(factory=list)   # model.name values (fine-tunable); []: the base's model only
    max_runs: Optional[int] = _f(None, ge=1)
    train_max_steps: Optional[int] = _f(None, ge=1)   # cap each sweep run's training (smoke sweeps)
    eval_max_images: Optional[int] = _f(None, ge=1)   # cap images captioned per split in each sweep run


# keys that say where a run lives, not what it computes: never part of a fingerprint
LOCATION_KEYS = ("run.name", "run.output_dir", "run.mount_drive", "run.persist_dir")


@dataclass
class Params:
    run: RunParams = _f(factory=RunParams)
    data: DataParams = _f(factory=DataParams)
    model: ModelParams = _f(factory=ModelParams)
    generation: GenerationParams = _f(factory=GenerationParams)
    zero_shot: ZeroShotParams = _f(factory=ZeroShotParams)
    train: TrainParams = _f(factory=TrainParams)
    evaluate: EvaluateParams = _f(factory=EvaluateParams)
    ablation: AblationParams = _f(factory=AblationParams)

    # where the values came from (a file path or "<dict>"), not part of the schema
    source_file: Optional[str] = field(default=None, compare=False, metadata={"internal": True})
    raw: dict = field(default_factory=dict, compare=False, repr=False, metadata={"internal": True})

    # ---- derived ------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def processed_dir(self) -> Path:
        return Path(self.data.processed_dir or Path(self.data.root) / "processed")

    @property
    def images_dir(self) -> Path:
        return Path(self.data.images_dir or self.data.root)

    @property
    def train_method(self) -> str:
        """"qlora" (4-bit NF4 base + LoRA) or "lora", from the one switch ``model.load_in_4bit``."""
        return "qlora" if self.model.load_in_4bit else "lora"

    # ---- the one API --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "<dict>",
                  base_dir: Optional[str | os.PathLike] = None, check_paths: bool = True) -> "Params":
        """Validate a mapping of sections (as in a params file); errors name ``source`` and the key."""
        if not isinstance(values, Mapping):
            raise ParamsError(f"{source}: the top level must be a mapping of sections")
        raw = copy.deepcopy(dict(values))
        try:
            params = _build(cls, raw, "")
        except ParamsError as e:
            raise ParamsError(f"{source}: {e}") from None
        params.source_file = source
        params.raw = raw
        _resolve_paths(params, Path(base_dir) if base_dir else Path.cwd(), source, check_paths)
        _check_consistency(params, source)
        return params

    def with_overrides(self, overrides: Mapping[str, Any] | Sequence[str]) -> "Params":
        """A new validated Params with dotted-key overrides applied to the values this one came from."""
        if not isinstance(overrides, Mapping):
            overrides = parse_overrides(overrides)
        raw = copy.deepcopy(self.raw) if self.raw else self.to_dict()
        for key, value in overrides.items():
            try:
                _set_dotted(raw, key, value)
            except ParamsError as e:
                raise ParamsError(f"{self.source_file or '<params>'}: {e}") from None
        return Params.from_dict(raw, source=self.source_file or "<params>", base_dir=self._base_dir())

    def fingerprint(self, exclude: Iterable[str] = ()) -> str:
        """12 hex chars over everything that changes results; run location always excluded.
        ``exclude`` takes dotted keys (``train.eval_every``) or whole sections (``ablation``)."""
        d = self.to_dict()
        for key in (*LOCATION_KEYS, *exclude):
            node, parts = d, key.split(".")
            for p in parts[:-1]:
                node = node.get(p, {})
            node.pop(parts[-1], None)
        blob = json.dumps(d, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        d.pop("raw", None)
        return d

    def _base_dir(self) -> Path:
        src = self.source_file
        return project_dir_for(Path(src)) if src and Path(src).is_file() else Path.cwd()


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------

_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints and '3e-4' accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise ParamsError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ParamsError:
                continue
        raise ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"{where}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping (section), got {value!r}")
        return _build(tp, value, where)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)   # YAML 1.1 reads 3e-4 (no dot) as a string
    if tp is str and isinstance(value, str):
        return value
    hint = " (write numbers without quotes)" if isinstance(value, str) and tp in (int, float) else ""
    raise ParamsError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}")


_BOUNDS = {"ge": ("≥", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("≤", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _check_range(value: Any, meta: Mapping[str, Any], where: str) -> None:
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_range(v, meta, f"{where}[{i}]")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return   # None, 'all', strings: no range
    limits = [(name, meta[name]) for name in _BOUNDS if name in meta]
    if not all(_BOUNDS[name][1](value, bound) for name, bound in limits):
        allowed = " and ".join(f"{_BOUNDS[name][0]} {bound:g}" for name, bound in limits)
        raise ParamsError(f"{where}: must be {allowed}, got {value!r}")


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        hint = RENAMED.get(f"{prefix}{unknown[0]}")
        raise ParamsError(f"unknown key {prefix}{unknown[0]!s}" + (
            f" ({hint})" if hint else f" (known keys{' of ' + where if where else ''}: {', '.join(fields)})"))
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
        _check_range(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


# keys that existed once: a file that still has one gets told what replaced it
RENAMED = {"train.method": "removed: set model.load_in_4bit true for QLoRA, false for LoRA",
           "run.drive_dir": "removed: set run.persist_dir to a folder on Drive, with run.mount_drive true"}


def _walk_fields(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _walk_fields(value, key + ".")
        else:
            yield obj, f, key, value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ParamsError(f"override {dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.lora_rank=8"]`` → ``{"train.lora_rank": 8}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ParamsError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return out


def project_dir_for(params_file: Path) -> Path:
    params_file = Path(params_file).resolve()
    parent = params_file.parent
    return parent.parent if parent.name == "params" else parent


def _resolve_paths(params: Params, base: Path, source: str, check_paths: bool) -> None:
    """Make path keys absolute: inside ``run.persist_dir`` when set, else against ``base``."""
    persist = params.run.persist_dir
    if persist:
        persist_path = Path(os.path.expanduser(persist))
        if not persist_path.is_absolute():
            persist_path = base / persist_path
        params.run.persist_dir = str(persist_path)
        base = persist_path
    for obj, f, key, value in _walk_fields(params):
        if f.metadata.get("path") and isinstance(value, str):
            resolved = Path(os.path.expanduser(value))
            if not resolved.is_absolute():
                resolved = base / resolved
            setattr(obj, f.name, str(resolved))
            if check_paths and f.metadata.get("must_exist") and not resolved.exists():
                raise ParamsError(f"{source}: {key}: file not found: {resolved}")


def load_params(path: str | os.PathLike, overrides: Optional[Mapping[str, Any] | Sequence[str]] = None,
                check_paths: bool = True) -> Params:
    """Load and validate a params YAML; ``overrides`` maps dotted keys (``train.lora_rank``) to values.

    Raises ParamsError naming the file and key for an unknown key, a wrong type, an out-of-range value
    or a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        try:
            _set_dotted(raw, key, value)
        except ParamsError as e:
            raise ParamsError(f"{path}: {e}") from None
    return Params.from_dict(raw, source=str(path.resolve()), base_dir=project_dir_for(path),
                            check_paths=check_paths)


CUDAGRAPH_NEEDS = {   # why train.cudagraphs needs each setting (docs/training.md "CUDA graphs")
    "model.compile": "replays the compiled language layers' graphs: needs model.compile: true",
    "train.gradient_checkpointing": "compiled blocks are not used with train.gradient_checkpointing: set it false",
    "train.group_by_grid": "records one graph per batch shape: needs train.group_by_grid: true (a micro-batch of "
                           "one visual grid, so few shapes)",
}


def _check_consistency(p: Params, source: str) -> None:
    def fail(key: str, msg: str):
        raise ParamsError(f"{source}: {key}: {msg}")

    t = p.train
    if t.effective_batch_size % t.micro_batch_size:
        fail("train.effective_batch_size",
             f"must be a multiple of train.micro_batch_size ({t.micro_batch_size})")
    if t.captions_per_image and not t.pack_captions:
        fail("train.captions_per_image", "only applies with train.pack_captions: true (set it to 0 or turn packing on)")
    if t.pack_captions and p.model.attn_implementation == "flash_attention_2":
        fail("train.pack_captions", "needs an explicit 4-D attention mask: use model.attn_implementation sdpa "
             "(or eager/auto), not flash_attention_2")
    if t.cudagraphs:
        why = {"model.compile": not p.model.compile, "train.gradient_checkpointing": t.gradient_checkpointing,
               "train.group_by_grid": not t.group_by_grid}
        for key, bad in why.items():
            if bad:
                fail("train.cudagraphs", CUDAGRAPH_NEEDS[key] + " (or set train.cudagraphs: false)")
    if p.model.min_pixels > p.model.max_pixels:
        fail("model.min_pixels", "must not exceed model.max_pixels")
    for i, size in enumerate(p.data.toy.image_sizes):
        if len(size) != 2 or min(size) < 28:
            fail(f"data.toy.image_sizes[{i}]", "must be [width, height], each ≥ 28")
    for key in ("run.name",):
        name = p.run.name
        if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            fail(key, "must be a non-empty folder name without slashes")
    for section in ("zero_shot", "evaluate"):
        if not getattr(p, section).splits:
            fail(f"{section}.splits", "must name at least one split (e.g. [test, yj_test])")
    for i, word in enumerate(p.generation.constraints.ban_words):
        if not word.strip():
            fail(f"generation.constraints.ban_words[{i}]", "must be a non-empty term (remove the empty entry)")
    tiny = p.model.tiny
    if tiny.hidden_size % tiny.num_attention_heads or tiny.num_attention_heads % tiny.num_key_value_heads:
        fail("model.tiny.num_attention_heads",
             "hidden_size must be a multiple of num_attention_heads, and that of num_key_value_heads")


def save_resolved(params: Params, run_dir: Optional[Path] = None) -> Path:
    """Write the resolved params (every default filled in) to ``<run_dir>/params.yaml``."""
    run_dir = Path(run_dir or params.run_dir)
    body = yaml.safe_dump(params.to_dict(), allow_unicode=True, sort_keys=False)
    header = f"# resolved from {params.source_file}\n# params fingerprint: {params.fingerprint()}\n"
    return atomic_write_text(run_dir / "params.yaml", header + body)


def field_docs() -> dict[str, str]:
    """Every dotted key of the schema with its type and default (used by docs and tests)."""
    out = {}
    for obj, f, key, value in _walk_fields(Params()):
        hint = typing.get_type_hints(type(obj))[f.name]
        out[key] = f"{_type_name(hint)} = {value!r}"
    return out

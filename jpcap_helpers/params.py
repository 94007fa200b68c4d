"""The one params schema: typed sections with defaults, loaded from YAML and validated before any
model or data loads. Documented field by field in docs/params.md (tests keep the two in sync).

Relative paths in a params file are resolved against the *project folder*: the parent of the
``params/`` folder that holds the file (or the file's own folder when it is not in ``params/``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .io import atomic_write_text


class ParamsError(ValueError):
    """A params file is wrong; the message names the file and the key."""


def _path_field(default: Optional[str], must_exist: bool = False, doc: str = ""):
    return field(default=default, metadata={"path": True, "must_exist": must_exist, "doc": doc})


@dataclass
class RunParams:
    name: str = "default"                 # run folder name under output_dir
    output_dir: str = _path_field("outputs")
    seed: int = 0
    mount_drive: bool = False             # Colab: mount Google Drive and keep outputs there
    drive_dir: str = "/content/drive/MyDrive/jpcap"  # output_dir on Drive when mount_drive


@dataclass
class ToyDataParams:
    n_train: int = 480                    # jp-shapes images standing in for STAIR train
    n_val: int = 160                      # images standing in for STAIR val (carved into val/test)
    n_yj: int = 80                        # images with YJ-style captions (some reuse train images)
    yj_train_overlap: float = 0.4         # share of YJ images taken from the train images
    image_sizes: list[list[int]] = field(default_factory=lambda: [[112, 112], [140, 112], [112, 140], [168, 126]])
    seed: int = 0


@dataclass
class DataParams:
    source: Literal["jp-shapes", "stair"] = "jp-shapes"
    root: str = _path_field("data/jp-shapes")    # STAIR/YJ json files live here
    images_dir: Optional[str] = _path_field(None)  # COCO root holding train2014/ val2014/ (default: root)
    processed_dir: Optional[str] = _path_field(None)  # default: <root>/processed
    download: bool = False                # stair: fetch STAIR, YJ and the needed COCO images
    use_yj: bool = True
    karpathy_json: Optional[str] = _path_field(None, must_exist=True)
    val_size: int = 5000
    test_size: int = 5000
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    test_subset: Optional[int] = None
    yj_subset: Optional[int] = None
    max_caption_tokens: int = 64
    toy: ToyDataParams = field(default_factory=ToyDataParams)


@dataclass
class TinyModelParams:
    """Architecture of the offline tiny Qwen2-VL (real transformers classes, random init)."""
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_num_heads: int = 4
    tokenizer_vocab_size: int = 800
    seed: int = 0


@dataclass
class ModelParams:
    name: str = "tiny-qwen2-vl"           # a registry key (docs/models.md) or a local folder
    revision: Optional[str] = None        # overrides the registry's pinned revision
    trust_remote_code: bool = False       # explicit opt-in for models that need remote code
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    load_in_4bit: bool = False
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    compile: bool = True                  # regional torch.compile on GPUs of compute capability ≥ 8.0
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    models_dir: str = _path_field("outputs/models")  # where the tiny model is built
    tiny: TinyModelParams = field(default_factory=TinyModelParams)


@dataclass
class GenerationParams:
    batch_size: int = 16
    max_new_tokens: int = 40
    num_beams: int = 1
    prompt: Optional[str] = None          # None: the model's registry prompt
    decoder: Literal["auto", "hf"] = "auto"  # auto: static-cache greedy decoder where supported


@dataclass
class ZeroShotParams:
    models: list[str] = field(default_factory=lambda: ["tiny-qwen2-vl"])
    splits: list[str] = field(default_factory=lambda: ["test", "yj_test"])
    max_images: Optional[int] = None      # per split; None = all


@dataclass
class TrainParams:
    method: Literal["qlora", "lora"] = "qlora"   # lora = bf16/fp32 LoRA without 4-bit
    lora_rank: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    top_k_layers: Union[int, Literal["all"]] = 6
    projector: Literal["trainable", "frozen"] = "trainable"
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 3.0
    max_steps: Optional[int] = None
    micro_batch_size: int = 8
    effective_batch_size: int = 16
    gradient_checkpointing: bool = True
    max_grad_norm: float = 1.0
    eval_every: int = 200                 # optimizer steps between validations
    eval_images: int = 200
    save_every: int = 200
    merge_adapter: bool = False


@dataclass
class EvaluateParams:
    splits: list[str] = field(default_factory=lambda: ["test", "yj_test"])
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class AblationParams:
    mode: Literal["one_factor", "grid"] = "one_factor"
    lora_rank: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    top_k_layers: list[Union[int, Literal["all"]]] = field(default_factory=lambda: [2, 6, 12, "all"])
    projector: list[Literal["trainable", "frozen"]] = field(default_factory=lambda: ["trainable", "frozen"])
    max_runs: Optional[int] = None
    train_max_steps: Optional[int] = None   # cap each sweep run's training (smoke sweeps)
    eval_max_images: Optional[int] = None   # cap images captioned per split in each sweep run


@dataclass
class Params:
    run: RunParams = field(default_factory=RunParams)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    generation: GenerationParams = field(default_factory=GenerationParams)
    zero_shot: ZeroShotParams = field(default_factory=ZeroShotParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    ablation: AblationParams = field(default_factory=AblationParams)

    # set by load_params, not part of the schema
    source_file: Optional[str] = field(default=None, compare=False, metadata={"internal": True})

    # ---- derived locations -------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def processed_dir(self) -> Path:
        return Path(self.data.processed_dir or Path(self.data.root) / "processed")

    @property
    def images_dir(self) -> Path:
        return Path(self.data.images_dir or self.data.root)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        return d

    def hash(self) -> str:
        """Short hash of everything that changes results (run name and output folder excluded)."""
        d = self.to_dict()
        d["run"] = {k: v for k, v in d["run"].items() if k not in ("name", "output_dir", "mount_drive", "drive_dir")}
        blob = json.dumps(d, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------

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
    """Check ``value`` against the annotation ``tp``; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise ParamsError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ParamsError as e:
                errors.append(e)
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
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ParamsError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ParamsError(
            f"unknown key {prefix}{unknown[0]!s} (known keys{' of ' + where if where else ''}: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


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


def project_dir_for(params_file: Path) -> Path:
    params_file = Path(params_file).resolve()
    parent = params_file.parent
    return parent.parent if parent.name == "params" else parent


def load_params(path: str | os.PathLike, overrides: Optional[dict[str, Any]] = None,
                check_paths: bool = True) -> Params:
    """Load and validate a params YAML; ``overrides`` maps dotted keys (``train.lora_rank``) to values.

    Raises ParamsError naming the file and key for an unknown key, a wrong type or a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    for key, value in (overrides or {}).items():
        try:
            _set_dotted(raw, key, value)
        except ParamsError as e:
            raise ParamsError(f"{path}: {e}") from None
    try:
        params = _build(Params, raw, "")
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    params.source_file = str(path.resolve())
    base = project_dir_for(path)
    for obj, f, key, value in _walk_fields(params):
        if f.metadata.get("path") and isinstance(value, str):
            resolved = Path(os.path.expanduser(value))
            if not resolved.is_absolute():
                resolved = base / resolved
            setattr(obj, f.name, str(resolved))
            if check_paths and f.metadata.get("must_exist") and not resolved.exists():
                raise ParamsError(f"{path}: {key}: file not found: {resolved}")
    _check_consistency(params, path)
    return params


def _check_consistency(p: Params, path: Path) -> None:
    def fail(key: str, msg: str):
        raise ParamsError(f"{path}: {key}: {msg}")

    t = p.train
    if t.micro_batch_size < 1:
        fail("train.micro_batch_size", "must be ≥ 1")
    if t.effective_batch_size % t.micro_batch_size:
        fail("train.effective_batch_size",
             f"must be a multiple of train.micro_batch_size ({t.micro_batch_size})")
    if isinstance(t.top_k_layers, int) and t.top_k_layers < 1:
        fail("train.top_k_layers", "must be ≥ 1 or 'all'")
    if not 0 <= t.lora_dropout < 1:
        fail("train.lora_dropout", "must be in [0, 1)")
    if p.model.min_pixels > p.model.max_pixels:
        fail("model.min_pixels", "must not exceed model.max_pixels")
    if not 0 < p.evaluate.confidence < 1:
        fail("evaluate.confidence", "must be in (0, 1)")
    for key in ("n_train", "n_val"):
        if getattr(p.data.toy, key) < 1:
            fail(f"data.toy.{key}", "must be ≥ 1")
    for i, size in enumerate(p.data.toy.image_sizes):
        if len(size) != 2 or min(size) < 28:
            fail(f"data.toy.image_sizes[{i}]", "must be [width, height], each ≥ 28")
    if not p.run.name or any(c in p.run.name for c in "/\\"):
        fail("run.name", "must be a non-empty folder name without slashes")
    if p.model.trust_remote_code is False:
        pass  # checked against the registry when the model loads (models.resolve)


def save_resolved(params: Params, run_dir: Optional[Path] = None) -> Path:
    """Write the resolved params (every default filled in) to ``<run_dir>/params.yaml``."""
    run_dir = Path(run_dir or params.run_dir)
    body = yaml.safe_dump(params.to_dict(), allow_unicode=True, sort_keys=False)
    header = f"# resolved from {params.source_file}\n# params hash: {params.hash()}\n"
    return atomic_write_text(run_dir / "params.yaml", header + body)


def start_run(params_file: str | os.PathLike, run_name: Optional[str] = None,
              overrides: Optional[dict[str, Any]] = None) -> Params:
    """What every notebook's first code cell calls: validate, create the run folder, save params."""
    overrides = dict(overrides or {})
    if run_name:
        overrides["run.name"] = run_name
    params = load_params(params_file, overrides)
    if params.run.mount_drive:
        from .colab import mount_drive
        drive = mount_drive()
        if drive:
            params.run.output_dir = params.run.drive_dir
    params.run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(params)
    return params


def field_docs() -> dict[str, str]:
    """Every dotted key of the schema with its type and default (used by docs and tests)."""
    out = {}
    for obj, f, key, value in _walk_fields(Params()):
        hint = typing.get_type_hints(type(obj))[f.name]
        out[key] = f"{_type_name(hint)} = {value!r}"
    return out

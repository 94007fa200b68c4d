"""Loading a registry model (shared by the caption engine and the trainer): where it loads from, the
revision (remote code only when pinned or explicitly allowed), precision per GPU, optional 4-bit NF4
(vision tower never quantized), the exact-math fast paths, an optional PEFT adapter."""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

from .precision import choose_dtype
from .registry import REGISTRY, ModelEntry, ModelError, family_module, resolve
from .tiny import TINY_KEY, ensure_tiny_model, tiny_model_dir

__all__ = ["SKIP_QUANT_MODULES", "ADAPTER_INFO_FILE", "model_path", "pinned_revision", "runs_pinned",
           "remote_code_opted_in", "pinned_settings", "quantization_config",
           "cpu_safe_4bit", "dequantize_4bit", "read_adapter_info", "adapter_load_in_4bit", "load_processor",
           "load_model", "load_tokenizer"]

# transformers 5 matches skip patterns from the start of the module name or as a suffix: "visual"
# alone does NOT match "model.visual.*" and the vision tower would silently be quantized.
SKIP_QUANT_MODULES = ["model.visual", "visual", "lm_head"]

# what the trainer records about an adapter, next to its adapter_config.json (base_load_in_4bit, ...)
ADAPTER_INFO_FILE = "jpcap_train.json"


def model_path(params: Any, name: Optional[str] = None) -> str:
    """Where ``from_pretrained`` should load ``name`` from: the tiny model's folder or a hub id."""
    name = name or params.model.name
    if name == TINY_KEY:
        return str(tiny_model_dir(params))
    entry = resolve(name)
    return entry.hub_id if entry.hub_id != name or not Path(name).exists() else name


def pinned_revision(entry: ModelEntry, revision: Optional[str] = None, allow_unpinned: bool = False,
                    remote: Optional[bool] = None) -> Optional[str]:
    """The revision to load (``revision``, i.e. ``model.revision``, else the registry's). A model that
    runs Python from its hub repository (``remote``; default: a ``pinned_env`` entry) is refused without
    a pinned revision unless ``allow_unpinned`` (``model.allow_unpinned_remote_code``) says so."""
    revision = revision or entry.revision
    remote = entry.loader == "pinned_env" if remote is None else remote
    if remote and not revision and not allow_unpinned:
        raise ModelError(
            f"{entry.key} ({entry.hub_id}) runs code from its hub repository and no revision is pinned: "
            "read that code, then set model.revision to its commit hash, or set "
            "model.allow_unpinned_remote_code: true to run whatever the repository holds today")
    return revision


@contextlib.contextmanager
def hub_errors(entry: ModelEntry, path: str):
    """Turn transformers' multi-line "couldn't connect / not in the cache" OSErrors into one ModelError
    naming the model and the fix (a newcomer offline, on a CPU runtime, or without a login)."""
    try:
        yield
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else ""
        gated = " It is gated: accept its licence on the hub and log in (jpcap_helpers.colab.hf_login)." if entry.gated else ""
        raise ModelError(
            f"{entry.key}: cannot load {path} — not in the local cache and the hub is not reachable{offline} "
            f"({first}). Connect to the internet once (it is cached afterwards, in run.persist_dir when set), "
            f"or set model.name to a local folder in the hub layout.{gated}") from None


def runs_pinned(params: Any, entry: ModelEntry) -> bool:
    """Whether ``entry`` captions in its pinned environment: a ``pinned_env`` entry always, another one
    with a recipe when ``model.loads: pinned_env`` asks for it."""
    return entry.loader == "pinned_env" or (params.model.loads == "pinned_env" and entry.pinned is not None)


def _trust_item(params: Any, entry: ModelEntry) -> Optional[str]:
    """The ``model.trust_remote_code`` list item naming ``entry`` (``key``, ``hub_id`` or either with
    ``@commit``), or None."""
    trust = params.model.trust_remote_code
    if isinstance(trust, list):
        return next((t for t in trust if t.split("@", 1)[0] in (entry.key, entry.hub_id)), None)
    return entry.key if trust is True and params.model.name in (entry.key, entry.hub_id) else None


def remote_code_opted_in(params: Any, entry: ModelEntry) -> bool:
    """``model.trust_remote_code`` names this model (a list of registry keys / hub ids, each optionally
    ``@commit``), or is ``true`` while ``model.name`` is this model: the opt-in is per model, never for
    a whole zero-shot list."""
    return _trust_item(params, entry) is not None


def pinned_settings(params: Any, entry: ModelEntry) -> dict:
    """What the pinned runner of ``entry`` needs from ``params``: the opt-in and the pin checked first
    (before any environment is built or anything reaches the hub); a :class:`ModelError` says the fix."""
    if entry.pinned is None:
        raise ModelError(f"{entry.key}: no pinned-environment recipe in the registry; model.loads: pinned_env "
                         "works for " + ", ".join(k for k, e in REGISTRY.items() if e.pinned))
    if not remote_code_opted_in(params, entry):
        raise ModelError(f"{entry.key} ({entry.hub_id}) runs Python code from its hub repository (in its own "
                         f"pinned environment): read that code, then opt in for this model with "
                         f"model.trust_remote_code: [{entry.key}] in your params file")
    item = _trust_item(params, entry) or ""
    own = params.model.revision if params.model.name in (entry.key, entry.hub_id) else None
    revision = pinned_revision(entry, item.split("@", 1)[1] if "@" in item else own,
                               params.model.allow_unpinned_remote_code, remote=True)
    dtype = choose_dtype(params.model.precision)
    quant = entry.load_in_4bit if entry.load_in_4bit is not None else params.model.load_in_4bit
    return {"revision": revision, "dtype": str(dtype).replace("torch.", ""), "load_in_4bit": bool(quant)}


def _hub_kwargs(params: Any, entry: ModelEntry) -> dict:
    """``revision`` argument of every ``from_pretrained`` of ``entry`` (native code only: hub code runs
    in a pinned environment, never in this process)."""
    revision = pinned_revision(entry, params.model.revision, params.model.allow_unpinned_remote_code)
    return {"revision": revision} if revision else {}


def quantization_config(compute_dtype: Any) -> Any:
    """4-bit NF4 with double quantization; the vision tower and lm_head stay unquantized."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=SKIP_QUANT_MODULES)


def cpu_safe_4bit(model: Any) -> int:
    """bitsandbytes ≥0.50 on CPU repacks 4-bit weights on the first no-grad forward (avx512-bf16
    path), which breaks the next training step; turn that off on every Linear4bit. Returns the count."""
    n = 0
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def dequantize_4bit(model: Any) -> Any:
    """``model`` with every NF4 layer replaced by a plain linear layer holding exactly the weights the
    4-bit layer computes with (bitsandbytes' dequantization, in the model's dtype; transformers'
    ``dequantize``): the same function at the full-precision layers' speed and ≈ 4× those layers'
    4-bit memory. The step that lets a QLoRA adapter be merged for captioning."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "dequantized in <dtype>" notice, once per process
    try:
        model = model.dequantize()
    finally:
        hf_logging.set_verbosity(level)
    left = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    if left:
        raise ModelError(f"dequantizing the 4-bit base left {len(left)} 4-bit layers (first: {left[0]}): set "
                         "generation.merge_qlora_adapter: false to caption with the adapter kept separate")
    return model


def read_adapter_info(adapter: str | Path) -> dict:
    """The trainer's record of an adapter (:data:`ADAPTER_INFO_FILE` in its folder); {} when absent."""
    path = Path(adapter) / ADAPTER_INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        warnings.warn(f"{path}: not valid JSON; using the params file for the adapter's base", stacklevel=2)
        return {}


def adapter_load_in_4bit(params: Any, adapter: str | Path) -> bool:
    """Whether ``adapter``'s base loads in 4 bit: as it was trained (its recorded
    ``base_load_in_4bit``) when recorded, else ``model.load_in_4bit``. A disagreement with the params
    file, or another recorded base model, is warned about: the adapter's record wins."""
    info = read_adapter_info(adapter)
    want = bool(params.model.load_in_4bit)
    base = info.get("base_model")
    if base is not None and base != params.model.name:
        warnings.warn(f"adapter {adapter} was trained on {base!r}, but model.name is {params.model.name!r}", stacklevel=2)
    if "base_load_in_4bit" not in info:
        return want
    recorded = bool(info["base_load_in_4bit"])
    if recorded != want:
        warnings.warn(f"adapter {adapter} was trained on a {'4-bit' if recorded else 'full-precision'} base but "
                      f"model.load_in_4bit is {want}: loading the base as the adapter was trained "
                      f"(load_in_4bit={recorded})", stacklevel=2)
    return recorded


# config.json model_type(s) a local folder of each family has (a --model-path check)
FAMILY_MODEL_TYPES = {"qwen2_vl": ("qwen2_vl",), "qwen2_5_vl": ("qwen2_5_vl",), "qwen3_vl": ("qwen3_vl",),
                      "paligemma": ("paligemma",), "llava_jp": ("llava-jp",), "asagi": ("llava", "asagi")}


def check_model_folder(entry: ModelEntry, folder: str | Path) -> Path:
    """``folder`` as a local copy of ``entry``'s checkpoint: it exists, has a config.json, and that
    config is of ``entry``'s family; else one :class:`ModelError` naming the folder and the fix."""
    folder = Path(folder).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"{entry.key}: model path {folder} has no config.json — give the folder holding the "
                         f"checkpoint in the hub layout of {entry.hub_id}")
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ModelError(f"{entry.key}: {config} is not a JSON object — re-download the checkpoint") from None
    expected = FAMILY_MODEL_TYPES.get(entry.family)
    if expected and kind not in expected:
        raise ModelError(f"{entry.key}: model path {folder} holds a {kind!r} model, not {entry.key}'s family "
                         f"({' / '.join(expected)}) — use that folder with its own model name, or point the "
                         f"path at a copy of {entry.hub_id}")
    return folder


def _source(params: Any, name: Optional[str], path: Optional[str] = None) -> tuple[ModelEntry, str, dict]:
    """(registry entry, path or hub id, revision kwargs) of ``name``, loaded from ``path`` (a local
    folder in the hub layout) when given; builds the tiny model."""
    name = name or params.model.name
    entry = resolve(name)
    if path is not None:
        return entry, str(check_model_folder(entry, path)), {}
    kwargs = _hub_kwargs(params, entry)
    if entry.key == TINY_KEY:
        ensure_tiny_model(params)
    return entry, model_path(params, name), kwargs


def load_processor(params: Any, name: Optional[str] = None, path: Optional[str] = None) -> Any:
    """The model's processor, with its family's extra arguments (Qwen families: ``model.min_pixels`` /
    ``max_pixels`` as their image size bounds; PaliGemma and others keep their own input size)."""
    from transformers import AutoProcessor

    entry, path, kwargs = _source(params, name, path)
    ported = _ported(entry)
    if ported is not None:
        with hub_errors(entry, path):
            return ported.load_processor(entry, path, revision=kwargs.get("revision"))
    kwargs.update(family_module(entry.family).processor_kwargs(params))
    with hub_errors(entry, path):
        return AutoProcessor.from_pretrained(path, **kwargs)


def _ported(entry: ModelEntry) -> Any:
    """The family module when the family is ported in this package (it provides ``load_model`` /
    ``load_processor``, e.g. :mod:`.llava_jp`) rather than loaded through transformers' Auto classes."""
    module = family_module(entry.family)
    return module if hasattr(module, "load_model") else None


def _load_ported(module: Any, entry: ModelEntry, path: str, revision: Optional[str], dtype: Any, quant: bool,
                 adapter: Optional[str], for_training: bool) -> tuple[Any, Any, ModelEntry]:
    """A ported family: full or half precision only, captioning only (no 4-bit, adapters or training)."""
    import torch

    if quant or adapter or for_training:
        what = "4-bit loading" if quant else "adapters" if adapter else "fine-tuning"
        raise ModelError(f"{entry.key}: {what} is not supported for this ported model (captioning only): "
                         "set model.load_in_4bit: false (it fits a T4 in fp16) and use it zero-shot")
    with hub_errors(entry, path):
        model, processor = module.load_model(entry, path, dtype, revision=revision)
    if torch.cuda.is_available():
        model = model.to(f"cuda:{torch.cuda.current_device()}")
    model.eval()
    model.jpcap_commit = getattr(model, "jpcap_commit", None) or revision
    model.jpcap_compile = False
    model.jpcap_compile_tuning = False
    return model, processor, entry


def load_model(params: Any, name: Optional[str] = None, *, load_in_4bit: Optional[bool] = None,
               adapter: Optional[str] = None, for_training: bool = False,
               path: Optional[str] = None) -> tuple[Any, Any, ModelEntry]:
    """(model, processor, entry) for ``name`` per ``params.model``: precision per GPU, 4-bit NF4 per
    ``load_in_4bit`` (default: ``model.load_in_4bit``, or for an adapter the base it was trained on),
    the fast paths of :mod:`.fastpath`, optional PEFT adapter; ``path``: a local folder in the hub
    layout of ``name``'s checkpoint (its family checked) (merged for inference on a
    full-precision base). Native transformers classes and this package's ports only: hub code runs
    in a pinned environment (:mod:`.pinned_env`), never here."""
    import torch
    from transformers import AutoModelForImageTextToText

    from .fastpath import compile_blocks, compile_supported, use_batched_vision_attention, use_linear_patch_embed
    from .fp8 import FAMILIES as FP8_FAMILIES
    from .fp8 import fp8_refusal, to_fp8

    name = name or params.model.name
    entry = resolve(name)
    if runs_pinned(params, entry):
        raise ModelError(f"{entry.key} runs in its own pinned environment (model.loads / the registry): it "
                         "captions through the engine's runs (02/04, `jpcap caption`), and cannot be loaded "
                         "into this process or fine-tuned")
    fp8 = "off" if for_training else params.generation.fp8
    if fp8 != "off":   # before any weights load
        refusal = fp8_refusal() or (None if entry.family in FP8_FAMILIES else
                                    f"generation.fp8 covers {', '.join(FP8_FAMILIES)}, not {entry.key} "
                                    f"({entry.family}): set generation.fp8: off")
        if refusal:
            raise ModelError(refusal)
    override = path  # a local folder in the hub layout instead of the hub id
    entry, path, kwargs = _source(params, name, override)
    dtype = choose_dtype(params.model.precision)
    if load_in_4bit is not None:
        quant = load_in_4bit
    else:
        quant = adapter_load_in_4bit(params, adapter) if adapter else params.model.load_in_4bit
    if fp8 != "off" and quant and not (adapter and params.generation.merge_qlora_adapter):
        raise ModelError("generation.fp8 converts full-precision layers, and this 4-bit (NF4) model stays 4-bit: set "
                         "model.load_in_4bit: false, or (a QLoRA adapter) generation.merge_qlora_adapter: true")
    kwargs["dtype"] = dtype
    if params.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = params.model.attn_implementation
    ported = _ported(entry)
    if ported is not None:
        return _load_ported(ported, entry, path, kwargs.get("revision"), dtype, quant, adapter, for_training)
    if quant:
        kwargs["quantization_config"] = quantization_config(dtype)
        # one GPU per process: under accelerate/torchrun each rank loads onto its own device
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    with hub_errors(entry, path):
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if quant and not torch.cuda.is_available():
        cpu_safe_4bit(model)
    use_linear_patch_embed(model)
    use_batched_vision_attention(model)  # one attention call per run of equal-size images
    visual = getattr(getattr(model, "model", None), "visual", None)
    compiled = bool(params.model.compile and compile_supported(model.config.model_type) and hasattr(visual, "blocks"))
    tuning = params.model.compile_tuning
    if compiled:   # the ViT is frozen: compiled for captioning and training alike (train.cudagraphs too:
        # its inputs take many sizes, and it is not launch-bound: run G2)
        compile_blocks(visual.blocks, tuned=tuning == "all" or (tuning == "training" and for_training))
    if not quant and torch.cuda.is_available():
        model = model.to(f"cuda:{torch.cuda.current_device()}")
    processor = load_processor(params, name, override)
    processor.tokenizer.padding_side = "left"
    dtype_name = str(dtype).replace("torch.", "")
    weights = "nf4" if quant else dtype_name
    if adapter:
        from peft import PeftModel
        # inference: fold LoRA into the weights (faster generation, benchmarks/RESULTS.md); a 4-bit
        # base is first dequantized to the values its layers compute with (merging into NF4 would
        # re-quantize and change outputs), unless generation.merge_qlora_adapter is off
        merge = not for_training and (not quant or params.generation.merge_qlora_adapter)
        if merge and quant:
            model = dequantize_4bit(model)
            weights = f"nf4 dequantized to {dtype_name}"
        model = PeftModel.from_pretrained(model, adapter, is_trainable=for_training)
        if merge:
            model = model.merge_and_unload()
        weights += ", adapter merged" if merge else " + adapter"
    if fp8 != "off":   # after the merge: the adapter's update is in the weights it quantizes
        weights += f", fp8 {fp8} ({to_fp8(model, fp8)} layers)"
    if not for_training:
        model.eval()
    model.jpcap_commit = getattr(model.config, "_commit_hash", None)
    model.jpcap_weights = weights  # recorded with the captions (predictions' .meta.json)
    model.jpcap_compile = compiled  # the caption engine compiles its prefill likewise
    model.jpcap_compile_tuning = compiled and tuning == "all"  # ... and tunes its kernels (fastpath.TUNING_OPTIONS)
    return model, processor, entry


def load_tokenizer(params: Any, name: Optional[str] = None) -> Any:
    """The model's tokenizer (what ``data.max_caption_tokens`` counts); builds the tiny model offline."""
    from transformers import AutoTokenizer

    entry, path, kwargs = _source(params, name)
    with hub_errors(entry, path):
        return AutoTokenizer.from_pretrained(path, **kwargs)

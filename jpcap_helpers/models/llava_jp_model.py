"""LLaVA-JP v1.1 as a native port: transformers' own SiglipVisionModel and GPT2LMHeadModel, plus the two
pieces of LLaVA-JP's code that are not transformers classes — the multi-scale "S2" image features and the
splice of the image into the text embeddings — written here from the architecture (no remote code).

The architecture (github.com/tosiyuki/LLaVA-JP, ``llava/model``; hub config of
``toshi456/llava-jp-1.3b-v1.1``), as ported:

* image: resized to ``S / min(scales)`` square (768 for SigLIP-384 with scales ``[1.0, 0.5]``), SigLIP
  normalisation; for each scale (config order) bicubic-resized to ``768 * scale`` (fp32), cut into square
  ``S``-pixel tiles (row-major), each tile through SigLIP; features = hidden state
  ``mm_vision_select_layer`` (−2), ``"patch"`` drops the first token (SigLIP has no CLS token: this drops a
  real patch, 729 → 728, as the original does); the n tokens are read as an ``h × w`` grid with
  ``h = ⌊√n⌋``, ``w = n / h`` (728 → 26 × 28, not the true 27 × 27 layout — again as the original);
  tiles are put back side by side, every scale is area-resized to ``h × w`` and the scales are
  concatenated on channels (2 × 1152 = 2304);
* projector ``mm_projector``: Linear(2304→2048) · GELU (exact) · Linear(2048→2048) (``mlp2x_gelu``);
* text: each chunk of the prompt around ``<image>`` tokenised on its own by the model's tokenizer (the
  llm-jp tokenizer appends ``<EOD|LLM-jp>`` to each), joined by the image placeholder −200; the final EOS
  is dropped (the original demo drops the last token); the placeholder is replaced in embedding space by
  the projected image features; padding is taken out and put back on the left, positions count real
  tokens only (0, 1, …);
* language model: GPT-2 (llm-jp-1.3b: 24 layers, 2048 wide), ``lm_head`` tied to ``wte``.

Checkpoint keys: ``transformer.*`` / ``lm_head.weight`` (GPT-2), ``model.vision_tower.vision_tower.*``
(SigLIP), ``model.mm_projector.{0,2}.*``; the vision tower's config (not its weights) comes from
``mm_vision_tower`` (a hub id in the cache, or a local folder, absolute or relative to the model folder).
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .registry import ModelError

__all__ = ["IMAGE_TOKEN_INDEX", "MODEL_TYPE", "LlavaJpError", "LlavaJpForCausalLM", "LlavaJpProcessor",
           "s2_features", "read_weights", "load_llava_jp", "load_llava_jp_processor"]

IMAGE_TOKEN_INDEX = -200
MODEL_TYPE = "llava-jp"
NAME = "LLaVA-JP"
# checkpoint prefix → module prefix here
KEY_MAP = (("transformer.", "language_model.transformer."),
           ("model.vision_tower.vision_tower.", "vision_tower."),
           ("model.mm_projector.", "mm_projector."))
GPT2_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
             "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
             "reorder_and_upcast_attn", "bos_token_id", "eos_token_id", "initializer_range")


class LlavaJpError(ModelError):
    """A LLaVA-JP folder that cannot be loaded; the message names the model and the fix."""


# --------------------------------------------------------------------------------------------------
# the S2 multi-scale features
# --------------------------------------------------------------------------------------------------

def _grid(n: int) -> tuple[int, int]:
    h = int(math.isqrt(n))
    if h * h == n:
        return h, h
    w = n // h
    if h * w != n:
        raise ValueError(f"{NAME}: {n} vision tokens cannot be read as an h × w grid (h = ⌊√n⌋)")
    return h, w


def _tiles(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, k·s, k·s) → (k·k·B, C, s, s): row-major tiles, each tile's batch together."""
    b, c, hh, ww = x.shape
    s, t = hh // k, ww // k
    return torch.cat([x[:, :, i * s:(i + 1) * s, j * t:(j + 1) * t] for i in range(k) for j in range(k)], dim=0)


def _untile(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_tiles` on feature maps: (k·k·B, C, h, w) → (B, C, k·h, k·w)."""
    b = x.shape[0] // (k * k)
    rows = [torch.cat([x[(i * k + j) * b:(i * k + j + 1) * b] for j in range(k)], dim=-1) for i in range(k)]
    return torch.cat(rows, dim=-2)


def s2_features(encode: Any, pixels: torch.Tensor, scales: list[float], tile: int) -> torch.Tensor:
    """Multi-scale features (B, h·w, C·len(scales)) of square ``pixels`` (B, 3, H, H); ``encode`` maps
    (N, 3, tile, tile) to (N, n, C)."""
    size = pixels.shape[-1]
    maps, grid = [], None
    for scale in scales:
        side = int(size * scale)
        k = math.ceil(side / tile)
        x = F.interpolate(pixels.float(), size=side, mode="bicubic").to(pixels.dtype)
        feats = encode(_tiles(x, k))
        h, w = _grid(feats.shape[1])
        grid = grid or (h, w)
        maps.append(_untile(feats.transpose(1, 2).reshape(feats.shape[0], -1, h, w), k))
    out = torch.cat([F.interpolate(m.float(), size=grid, mode="area").to(m.dtype) for m in maps], dim=1)
    return out.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------

class LlavaJpForCausalLM(nn.Module):
    """SigLIP (``vision_tower``) → S2 → ``mm_projector`` → spliced into GPT-2 (``language_model``)."""

    def __init__(self, config: dict, vision_config: Any):
        from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, SiglipVisionModel

        super().__init__()
        self.llava_config = dict(config)
        self.scales = [float(s) for s in (config.get("scales") or [1.0])]
        self.select_layer = int(config.get("mm_vision_select_layer", -2))
        self.select_feature = config.get("mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise LlavaJpError(f"{NAME}: mm_vision_select_feature {self.select_feature!r} is not supported")
        projector = config.get("mm_projector_type", "linear")
        if projector not in ("linear", "mlp2x_gelu"):
            raise LlavaJpError(f"{NAME}: mm_projector_type {projector!r} is not supported (linear, mlp2x_gelu)")
        gpt2 = GPT2Config(**{k: config[k] for k in GPT2_KEYS if k in config}, tie_word_embeddings=True,
                          embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
        self.config = gpt2
        self.vision_config = vision_config
        self.language_model = GPT2LMHeadModel(gpt2)
        self.language_model.lm_head.weight = self.language_model.transformer.wte.weight
        self.vision_tower = SiglipVisionModel(vision_config)
        mm_hidden = vision_config.hidden_size * len(self.scales)
        if config.get("mm_hidden_size", mm_hidden) != mm_hidden:
            raise LlavaJpError(f"{NAME}: mm_hidden_size {config['mm_hidden_size']} ≠ vision width "
                               f"{vision_config.hidden_size} × {len(self.scales)} scales")
        hidden = gpt2.n_embd
        self.mm_projector = (nn.Linear(mm_hidden, hidden) if projector == "linear" else
                             nn.Sequential(nn.Linear(mm_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden)))
        self.generation_config = GenerationConfig(eos_token_id=gpt2.eos_token_id, bos_token_id=gpt2.bos_token_id)
        self.image_size = int(round(vision_config.image_size / min(self.scales)))

    @property
    def device(self) -> torch.device:
        return self.language_model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.transformer.wte.weight.dtype

    # --- image features -------------------------------------------------------------------------
    def _encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        vt = self.vision_tower
        dtype = next(vt.parameters()).dtype
        out = vt(pixel_values=tiles.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        return feats[:, 1:] if self.select_feature == "patch" else feats

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, H) → projected image tokens (B, n, hidden)."""
        feats = s2_features(self._encode_tiles, pixel_values, self.scales, self.vision_config.image_size)
        return self.mm_projector(feats.to(self.mm_projector_dtype))

    @property
    def mm_projector_dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype

    # --- the splice -----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              pixel_values: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds, attention_mask, position_ids) with every −200 replaced by one image's tokens,
        the rows left-padded again (zeros), positions counting real tokens from 0."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n_images = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        n_given = 0 if pixel_values is None else pixel_values.shape[0]
        if n_images != n_given:
            raise ValueError(f"{NAME}: {n_images} <image> placeholders (id {IMAGE_TOKEN_INDEX}) but {n_given} images")
        feats = self.image_features(pixel_values) if n_images else None
        wte = self.language_model.transformer.wte
        rows, k = [], 0
        for ids, mask in zip(input_ids, attention_mask.bool()):
            ids = ids[mask]
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            pieces, start = [], 0
            for pos in where + [len(ids)]:
                pieces.append(wte(ids[start:pos]))
                if pos < len(ids):
                    pieces.append(feats[k].to(pieces[-1].dtype))
                    k += 1
                start = pos + 1
            rows.append(torch.cat(pieces))
        length = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = attention_mask.new_zeros(len(rows), length)
        positions = torch.zeros(len(rows), length, dtype=torch.long, device=input_ids.device)
        for i, r in enumerate(rows):
            n = r.shape[0]
            embeds[i, length - n:] = r
            mask[i, length - n:] = 1
            positions[i, length - n:] = torch.arange(n, device=input_ids.device)
        return embeds, mask, positions

    def _lm(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any = None,
            use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        kwargs = {"cache": cache} if _CACHE_KWARG == "cache" else {"past_key_values": cache}
        out = self.language_model.transformer(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                              use_cache=use_cache, **kwargs)
        new_cache = getattr(out, "cache", None) if _CACHE_KWARG == "cache" else getattr(out, "past_key_values", None)
        return self.language_model.lm_head(out.last_hidden_state), new_cache

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, L', vocab) over the spliced, left-padded sequence (L' = L − images + image tokens)."""
        embeds, mask, positions = self.embed(input_ids, attention_mask, pixel_values)
        return self._lm(embeds, mask, positions)[0]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, generation_config: Any = None,
                 max_new_tokens: Optional[int] = None, use_cache: bool = True, **_: Any) -> torch.Tensor:
        """Greedy decoding with a KV cache: ``input_ids`` followed by the new tokens (pad after a row's
        end token), as HF ``generate`` returns them. Beam search and sampling are not supported."""
        cfg = generation_config or self.generation_config
        if getattr(cfg, "num_beams", 1) not in (None, 1) or getattr(cfg, "do_sample", False):
            raise ValueError(f"{NAME}: only greedy decoding is supported (num_beams=1, do_sample=False)")
        steps = max_new_tokens or getattr(cfg, "max_new_tokens", None) or 40
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else []
        eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=input_ids.device)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        embeds, mask, positions = self.embed(input_ids, attention_mask, pixel_values)
        wte = self.language_model.transformer.wte
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new, cache, step_pos = [], None, positions[:, -1:]
        for _ in range(steps):
            if use_cache:
                logits, cache = self._lm(embeds, mask, positions, cache, use_cache=True)
            else:
                logits, _ = self._lm(embeds, mask, positions)
            tok = logits[:, -1].argmax(-1)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            new.append(tok)
            done = done | torch.isin(tok, eos)
            if bool(done.all()):
                break
            step_pos = step_pos + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            tok_embeds = wte(tok)[:, None]
            if use_cache:
                embeds, positions = tok_embeds, step_pos
            else:
                embeds = torch.cat([embeds, tok_embeds], dim=1)
                positions = torch.cat([positions, step_pos], dim=1)
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


def _cache_kwarg() -> str:
    import inspect

    from transformers import GPT2Model

    return "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


_CACHE_KWARG = _cache_kwarg()


# --------------------------------------------------------------------------------------------------
# the processor: LLaVA-JP's prompt tokenisation and image preprocessing
# --------------------------------------------------------------------------------------------------

class LlavaJpProcessor:
    """Prompts with ``<image>`` + PIL images → ``input_ids`` (−200 where the image goes, left-padded),
    ``attention_mask`` and ``pixel_values`` (SigLIP normalisation at the S2 input size)."""

    def __init__(self, tokenizer: Any, image_processor: Any, image_size: int, image_seq_length: int):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_size, self.image_seq_length = image_size, image_seq_length
        self.tokenizer.padding_side = "left"

    def tokenize(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
        ids: list[int] = []
        bos = tok.bos_token_id
        keep_bos = bool(chunks and chunks[0] and bos is not None and chunks[0][0] == bos)
        if keep_bos:
            ids.append(bos)
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[1:] if keep_bos and chunk and chunk[0] == bos else chunk)
        if ids and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]  # the tokenizer's end token after the prompt (the demo drops it too)
        return ids

    def __call__(self, text: Any = None, images: Any = None, padding: Any = True, return_tensors: str = "pt",
                 **_: Any) -> Any:
        from transformers import BatchFeature

        prompts = [text] if isinstance(text, str) else list(text)
        rows = [self.tokenize(p) for p in prompts]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, length - len(r):] = 1
        data = {"input_ids": ids, "attention_mask": mask}
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            data["pixel_values"] = self.image_processor(
                images=list(images), size={"height": self.image_size, "width": self.image_size},
                return_tensors="pt")["pixel_values"]
        return BatchFeature(data)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# loading the hub layout
# --------------------------------------------------------------------------------------------------

def _fail(folder: Path, what: str, fix: str) -> LlavaJpError:
    return LlavaJpError(f"{NAME} ({folder}): {what}. {fix}")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise _fail(folder, "no config.json", "Point model.name at a folder in the hub layout of "
                    "toshi456/llava-jp-1.3b-v1.1 (config.json, weights, tokenizer files).")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != MODEL_TYPE:
        raise _fail(folder, f"config.json has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r} "
                    "(another model family)", "Use this folder under its own registry entry, or point "
                    "model.name at a LLaVA-JP v1.1 folder.")
    if not config.get("mm_vision_tower"):
        raise _fail(folder, "config.json names no mm_vision_tower", "Add the vision tower (hub id or folder).")
    return config


def _weight_files(folder: Path) -> tuple[str, list[Path]]:
    for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            names = sorted(set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise _fail(folder, f"weight shards missing: {', '.join(missing)}",
                            "Download the complete checkpoint (all shards).")
            return kind, [folder / n for n in names]
        if (folder / single).is_file():
            return kind, [folder / single]
    raise _fail(folder, "no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])",
                "Download the checkpoint's weight files into the folder.")


def read_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint tensor, one file at a time; ``.bin`` files only through
    ``torch.load(weights_only=True)`` (tensors, no arbitrary objects)."""
    folder = Path(folder)
    kind, files = _weight_files(folder)
    for path in files:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise _fail(folder, f"{path.name} is not a plain tensor checkpoint ({type(exc).__name__})",
                            "Use the safetensors weights; pickled objects are never loaded.") from None
            yield from state.items()


def _vision_folder(folder: Path, tower: str, revision: Optional[str] = None) -> Path:
    for candidate in (Path(tower).expanduser(), folder / tower):
        if (candidate / "config.json").is_file():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(tower, allow_patterns=["config.json", "preprocessor_config.json"]))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(folder, f"vision tower {tower!r} (mm_vision_tower) not found: not a local folder, and "
                    f"not in the hub cache with the hub unreachable ({first[:160]})",
                    "Connect once so it is cached, or copy its config.json and preprocessor_config.json into "
                    "a folder and set mm_vision_tower in config.json to that path (absolute or relative to "
                    "the model folder); its weights are in the LLaVA-JP checkpoint already.") from None


def _vision_config(tower_dir: Path) -> Any:
    from transformers import SiglipVisionConfig

    raw = json.loads((tower_dir / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") == "siglip":
        raw = raw.get("vision_config") or {}
    elif raw.get("model_type") not in ("siglip_vision_model", None):
        raise LlavaJpError(f"{NAME}: vision tower {tower_dir} is {raw.get('model_type')!r}; only SigLIP "
                           "(v1.1) is ported")
    raw = {k: v for k, v in raw.items() if k != "model_type"}
    return SiglipVisionConfig(**raw)


def _image_processor(tower_dir: Path) -> Any:
    try:  # PIL resizing, as the SiglipImageProcessor of transformers 4.x that LLaVA-JP was trained with
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as cls
    except ImportError:  # pragma: no cover - older transformers 5
        from transformers import SiglipImageProcessor as cls
    if (tower_dir / "preprocessor_config.json").is_file():
        return cls.from_pretrained(str(tower_dir))
    return cls()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _no_init() -> Any:
    """Skip random initialisation (every weight is loaded next) where transformers offers it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return no_init_weights()


def _load_state(model: LlavaJpForCausalLM, folder: Path) -> None:
    params = dict(model.state_dict())
    tied = "language_model.lm_head.weight"
    loaded: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for key, tensor in read_weights(folder):
            if key == "lm_head.weight":
                continue  # tied to transformer.wte (GPT2LMHeadModel, tie_word_embeddings)
            name = next((new + key[len(old):] for old, new in KEY_MAP if key.startswith(old)), None)
            if name is None or name not in params:
                if not key.endswith((".attn.bias", ".attn.masked_bias")):  # old GPT-2 mask buffers
                    unexpected.append(key)
                continue
            if params[name].shape != tensor.shape:
                raise _fail(folder, f"{key} has shape {tuple(tensor.shape)}, config says {tuple(params[name].shape)}",
                            "config.json and the weights do not belong together.")
            params[name].copy_(tensor)
            loaded.add(name)
    head = "vision_tower.vision_model.head."  # SigLIP's pooling head: unused here, absent from some saves
    missing = sorted(k for k in set(params) - loaded - {tied} if not k.startswith(head))
    if missing or unexpected:
        detail = "; ".join(s for s in (f"missing {len(missing)} (e.g. {missing[:3]})" if missing else "",
                                       f"unknown {len(unexpected)} (e.g. {unexpected[:3]})" if unexpected else "") if s)
        raise _fail(folder, f"the weights are not a LLaVA-JP v1.1 checkpoint: {detail}",
                    "Point model.name at a complete toshi456/llava-jp-1.3b-v1.1 folder.")


def load_llava_jp(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LlavaJpForCausalLM, LlavaJpProcessor]:
    """(model, processor) from a folder in the hub layout of ``toshi456/llava-jp-1.3b-v1.1``."""
    from transformers import GenerationConfig

    folder = Path(folder)
    config = read_config(folder)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise _fail(folder, "no tokenizer (tokenizer.json / tokenizer_config.json)",
                    "Copy the checkpoint's tokenizer files into the folder.")
    _weight_files(folder)  # fail early, before building the model
    tower_dir = _vision_folder(folder, str(config["mm_vision_tower"]))
    vision_config = _vision_config(tower_dir)
    with _default_dtype(dtype), _no_init():
        model = LlavaJpForCausalLM(config, vision_config)
    _load_state(model, folder)
    lm = model.language_model
    lm.lm_head.weight = lm.transformer.wte.weight  # tied (GPT2LMHeadModel's tie_word_embeddings)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.eval()
    return model, _processor(folder, config, tower_dir, vision_config)


def load_llava_jp_processor(folder: str | Path) -> LlavaJpProcessor:
    """The processor of a LLaVA-JP folder without reading its weights."""
    folder = Path(folder)
    config = read_config(folder)
    tower_dir = _vision_folder(folder, str(config["mm_vision_tower"]))
    return _processor(folder, config, tower_dir, _vision_config(tower_dir))


def _processor(folder: Path, config: dict, tower_dir: Path, vision_config: Any) -> LlavaJpProcessor:
    from transformers import AutoTokenizer

    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise _fail(folder, "no tokenizer (tokenizer.json / tokenizer_config.json)",
                    "Copy the checkpoint's tokenizer files into the folder.")
    scales = [float(s) for s in (config.get("scales") or [1.0])]
    n = (vision_config.image_size // vision_config.patch_size) ** 2
    n = n - 1 if config.get("mm_vision_select_feature", "patch") == "patch" else n
    h, w = _grid(n)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns that "llava-jp" is unknown
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(level)
    return LlavaJpProcessor(tokenizer, _image_processor(tower_dir),
                            int(round(vision_config.image_size / min(scales))), h * w)

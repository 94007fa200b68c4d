"""Fast greedy caption decoding for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (the caption engine's default decoder).

HF ``generate`` pays, per batch, a Python loop over the rows to build multimodal rotary positions
(``get_rope_index``), a growing (dynamic) KV cache, and ~30 kernel launches per layer for every new
token. Captions are short and every prompt is the same text around one image, so this decoder:

1. takes batches whose images share one visual grid (the engine groups them so): no padding, the
   rotary positions are computed once for one row and shared, attention is plain causal;
2. runs the vision tower and projector (the model's own code; for Qwen2-VL its rotary positions and
   segment bounds are computed once per batch shape), then prefills the prompt through one
   layer function, ``_prefill_layer``, that writes keys and values straight into fixed buffers (the
   language model's layers' math, with Qwen3-VL's per-head q/k norms; on GPUs where ``model.compile``
   is on, one ``torch.compile`` of it serves every layer). Qwen3-VL's deepstack features are added at
   the image tokens after the first layers as its text model adds them (:mod:`..models.deepstack`).
   ``prefill="model"`` prefills through the model's forward and copies its cache instead (the previous
   default; the tests compare both);
3. decodes token by token with a fixed-shape step over those buffers. On CUDA the step is captured
   once per batch-size bucket as a CUDA graph and replayed (one launch per token instead of
   hundreds); a 4-bit (bitsandbytes) model runs the same step eagerly. ``compile_step`` compiles its
   two layer functions (before and after attention) to fuse their element-wise work.

``generate(..., while_busy=fn)`` calls ``fn`` once when the whole prefill has been queued on the GPU, so
the caller's CPU work (the engine prepares the next batch and writes the last one's rows) overlaps it.

Greedy only (beam search stays with HF ``generate``). Rows are cut at their first end token, so the
tokens equal HF greedy decoding's up to floating-point ties (tests compare both on the tiny model,
and on the GPU for the real shape).
"""
from __future__ import annotations

import sys
import time
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from ..models.deepstack import add_deepstack_at

__all__ = ["SUPPORTED_FAMILIES", "supports", "unwrap", "has_4bit", "GreedyDecoder"]

SUPPORTED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_CACHE_ROUND = 64  # KV capacity is rounded up to this many positions (fewer re-allocations)


def unwrap(model: Any) -> Any:
    """The ``*ForConditionalGeneration`` under a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports(model: Any, family: str, num_beams: int = 1) -> bool:
    """Whether :class:`GreedyDecoder` can caption with ``model``: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL
    language model with full attention in every layer, greedy decoding."""
    if family not in SUPPORTED_FAMILIES or num_beams != 1:
        return False
    base = unwrap(model)
    inner = getattr(base, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(base, "lm_head") or not hasattr(inner, "get_rope_index"):
        return False
    types_ = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
    return types_ == {"full_attention"} and getattr(lm.config, "_attn_implementation", "sdpa") != "flex_attention"


def has_4bit(model: Any) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def _bucket(n: int, cap: int) -> int:
    """Smallest power of two ≥ ``n``, or ``cap`` when that is larger than ``cap``."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max(cap, n))


def _qkv(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys, values ``(batch, heads, length, head_dim)`` as the model's attention makes them:
    Qwen3-VL normalises each query and key head (``q_norm`` / ``k_norm``) before the transpose."""
    bsz, length, _ = x.shape
    q = attn.q_proj(x).view(bsz, length, -1, attn.head_dim)
    k = attn.k_proj(x).view(bsz, length, -1, attn.head_dim)
    v = attn.v_proj(x).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v


def _prefill_layer(layer: Any, rope: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_out: torch.Tensor, v_out: torch.Tensor) -> torch.Tensor:
    """One decoder layer over the whole prompt (causal, no padding), writing its keys/values into the
    decoder's buffers. The same math as the model's layer; a plain function of its inputs, so one
    ``torch.compile`` of it serves every layer."""
    attn = layer.self_attn
    bsz, length, _ = h.shape
    x = layer.input_layernorm(h)
    q, k, v = _qkv(attn, x)
    q, k = rope(q, k, cos, sin)
    k_out.copy_(k)
    v_out.copy_(v)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                       enable_gqa=k.shape[1] != q.shape[1])
    h = h + attn.o_proj(o.transpose(1, 2).reshape(bsz, length, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _step_layer_in(layer: Any, rope: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A decoding step's layer up to attention: norm, projections, rotary (one new token per row)."""
    q, k, v = _qkv(layer.self_attn, layer.input_layernorm(h))
    q, k = rope(q, k, cos, sin)
    return q, k, v


def _step_layer_out(layer: Any, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """A decoding step's layer after attention: output projection, residuals, norm, MLP."""
    h = h + layer.self_attn.o_proj(o)
    return h + layer.mlp(layer.post_attention_layernorm(h))


_COMPILED: dict[tuple[str, bool], Any] = {}   # (layer function name, tuned) -> compiled


def _compiled(fn: Any, tuned: bool = False) -> Any:
    """One ``torch.compile`` of a layer function per process (dynamic shapes: every batch size and
    prompt length, every layer), shared by all decoders so that each engine run does not recompile;
    ``tuned``: its kernels' launch configurations tuned on first use (``fastpath.TUNING_OPTIONS``)."""
    from ..models.fastpath import TUNING_OPTIONS

    key = (fn.__name__, tuned)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True, **({"options": dict(TUNING_OPTIONS)} if tuned else {}))
    return _COMPILED[key]


class GreedyDecoder:
    """Greedy decoding of one-image caption prompts with a static KV cache (CUDA-graph steps on GPU).

    ``generate(inputs, max_new_tokens)`` takes the processor's output for a batch whose rows are
    identical apart from the image (same grid, no padding) and returns new token ids
    ``(batch, n ≤ max_new_tokens)``, each row padded with ``pad_id`` after its first end token.
    """

    def __init__(self, model: Any, *, eos_ids: Sequence[int], pad_id: Optional[int], max_batch: int,
                 cuda_graphs: Optional[bool] = None, prefill: str = "own", compile_prefill: bool = False,
                 compile_step: bool = False, constraints: Any = None):
        # weak: the engine keeps a decoder on its model (EngineOptions.reuse_decoder), and a strong reference
        # back would make a cycle that only the garbage collector frees (its GPU buffers with it)
        self._model = weakref.ref(model)
        # constrained decoding (engine/constraints.py): applied to the logits before every argmax
        self.constraints = constraints if constraints is not None and constraints.active else None
        base = unwrap(model)
        self.inner = base.model
        self.lm = self.inner.language_model
        self.head = base.lm_head
        self.image_token_id = base.config.image_token_id
        self.eos = sorted({int(i) for i in eos_ids})
        self.pad = int(pad_id if pad_id is not None else (self.eos[0] if self.eos else 0))
        self.max_batch = int(max_batch)
        first = next(p for p in self.lm.parameters())
        self.device = first.device
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and not has_4bit(model)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        attn0 = self.lm.layers[0].self_attn
        self._rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        if prefill not in ("model", "own"):
            raise ValueError(f"prefill must be 'model' or 'own', got {prefill!r}")
        # "own" (default): _prefill_layer straight into the buffers, compiled where the caller asks
        # (1.39x faster prefill on an H100: benchmarks/RESULTS.md); "model": the model's forward, its
        # KV cache copied into the buffers
        self.prefill = prefill
        tuned = bool(getattr(model, "jpcap_compile_tuning", False))  # model.compile_tuning: all
        self._prefill_fn = _compiled(_prefill_layer, tuned) if compile_prefill else _prefill_layer
        # the decoding step's element-wise work fused by torch.compile (the KV writes and attention stay
        # eager, inside the same CUDA graph)
        self._step_in = _compiled(_step_layer_in, tuned) if compile_step else _step_layer_in
        self._step_out = _compiled(_step_layer_out, tuned) if compile_step else _step_layer_out
        self.capacity = 0
        self._vision_cache: dict[tuple, dict] = {}
        self._graphs: dict[int, Any] = {}
        self._pool = None
        self.n_graph_captures = 0
        self.capture_seconds = 0.0  # host seconds in captures (each one synchronises and empties the caches)
        # per-step state, device scalars so that a captured graph reads the current values
        self.slot = torch.zeros((), dtype=torch.long, device=self.device)   # cache position of the fed token
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)    # its rotary (text) position
        self.step_idx = torch.zeros((), dtype=torch.long, device=self.device)

    # ---- buffers -----------------------------------------------------------------------------
    def _ensure_capacity(self, length: int, max_new: int, dtype: torch.dtype, kv_heads: int, head_dim: int) -> None:
        need = -(-(length + max_new) // _CACHE_ROUND) * _CACHE_ROUND
        if need <= self.capacity and self.k.dtype == dtype:
            if self.out.shape[1] < max_new:
                self.out = torch.full((self.max_batch, max_new), self.pad, dtype=torch.long, device=self.device)
                self._graphs.clear()
            return
        self._graphs.clear()  # captured graphs point at the old buffers
        self.k = self.v = None
        n_layers = len(self.lm.layers)
        shape = (n_layers, self.max_batch, kv_heads, need, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.positions = torch.arange(need, device=self.device)
        self.tok = torch.full((self.max_batch, 1), self.pad, dtype=torch.long, device=self.device)
        self.out = torch.full((self.max_batch, max(max_new, 1)), self.pad, dtype=torch.long, device=self.device)
        self.capacity = need

    # ---- the fixed-shape decoding step -------------------------------------------------------
    def _step(self, bp: int) -> None:
        """Feed ``tok[:bp]`` at cache slot ``slot`` / rotary position ``pos``; write the argmax to
        ``out[:, step_idx]`` and ``tok``; advance the counters. No host synchronisation."""
        tok = self.tok[:bp]
        h = self.lm.embed_tokens(tok)
        pos = self.pos.view(1, 1, 1).expand(3, bp, 1)
        cos, sin = self.lm.rotary_emb(h, pos)
        mask = (self.positions <= self.slot).view(1, 1, 1, -1)
        where = self.slot.view(1)
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            q, k, v = self._step_in(layer, self._rope, h, cos, sin)
            kc, vc = self.k[i, :bp], self.v[i, :bp]
            kc.index_copy_(2, where, k)
            vc.index_copy_(2, where, v)
            # one query token: the query heads of a KV group become that group's query rows (exact
            # grouped-query attention without repeating the cache)
            qg = q.reshape(bp, kc.shape[1], -1, attn.head_dim)
            o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask, scale=attn.scaling)
            h = self._step_out(layer, h, o.reshape(bp, 1, -1))
        logits = self.head(self.lm.norm(h)[:, -1])
        if self.constraints is not None:  # device tensors only: no host sync, capturable
            logits = self.constraints.apply(logits, self.out[:bp], self.step_idx)
        nxt = logits.argmax(-1)
        self.out[:bp].index_copy_(1, self.step_idx.view(1), nxt.view(bp, 1))
        self.tok[:bp].copy_(nxt.view(bp, 1))
        self.slot.add_(1)
        self.pos.add_(1)
        self.step_idx.add_(1)

    def _graph(self, bp: int):
        graph = self._graphs.get(bp)
        if graph is None:
            start = time.perf_counter()
            # the warm-up step really runs: point it at valid slots (the next batch overwrites them)
            for counter in (self.slot, self.pos, self.step_idx):
                counter.zero_()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step(bp)  # warm-up outside the graph (library handles, allocator)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: loader threads may pin host memory meanwhile (legal outside this thread)
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._step(bp)
            self._pool = graph.pool()
            self._graphs[bp] = graph
            self.n_graph_captures += 1
            self.capture_seconds += time.perf_counter() - start
        return graph

    # ---- one batch -----------------------------------------------------------------------------
    def _check_batch(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
        if ids.shape[0] > self.max_batch:
            raise ValueError(f"batch of {ids.shape[0]} rows exceeds max_batch={self.max_batch}")
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError("GreedyDecoder takes unpadded batches (images of one visual grid)")
        if grid.shape[0] != ids.shape[0] or not bool((grid == grid[:1]).all()) or not bool((ids == ids[:1]).all()):
            raise ValueError("GreedyDecoder takes batches of one image per row, all of one visual grid "
                             "and one prompt")
        return ids, grid

    def _vision_inputs(self, grid: torch.Tensor) -> Optional[dict]:
        """Qwen2-VL only: the vision tower's rotary positions and segment bounds for a batch of one grid,
        computed once per (batch, grid) and handed to the tower through transformers' precompute hook
        (``transformers.vision_utils``), instead of its per-image Python loop and host reads in every
        batch. The same values: one image's positions repeated, the same ``cu_seqlens``."""
        if type(self.inner.visual).__name__ != "Qwen2VisionTransformerPretrainedModel":
            return None
        try:
            from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids
        except ImportError:
            return None
        key = (grid.shape[0], *map(int, grid[0]))
        cached = self._vision_cache.get(key)
        if cached is None:
            visual = self.inner.visual
            on_device = grid.to(self.device)
            positions = get_vision_position_ids(on_device[:1], visual.spatial_merge_size)
            cu_seqlens, _ = get_vision_attention_seqlens(on_device, visual.config)
            cached = {"position_ids": positions.repeat(grid.shape[0], 1), "cu_seqlens": cu_seqlens}
            self._vision_cache[key] = cached
        return cached

    def _prompt_embeddings(self, kwargs: Mapping[str, Any], ids: torch.Tensor, grid: torch.Tensor
                           ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(token embeddings with the projector's image features at the image-pad positions, Qwen3-VL's
        deepstack features (else empty), those positions on the device). ``ids`` and ``grid``: the
        batch's host copies; every row has the same layout, so the positions come from row 0 and nothing
        here waits for the GPU."""
        embeds = self.lm.embed_tokens(kwargs["input_ids"])
        vision = self._vision_inputs(grid)
        if vision is None:
            image = self.inner.get_image_features(kwargs["pixel_values"], kwargs["image_grid_thw"], return_dict=True)
        else:
            image = self.inner.get_image_features(kwargs["pixel_values"], grid, return_dict=True, **vision)
        features = torch.cat(list(image.pooler_output), dim=0).to(embeds.dtype)
        deepstack = [torch.cat(list(f), dim=0) for f in (getattr(image, "deepstack_features", None) or [])]
        where = torch.nonzero(ids[0] == self.image_token_id).squeeze(1)
        if where.numel() * ids.shape[0] != features.shape[0]:
            raise ValueError(f"{where.numel()} image tokens per prompt but {features.shape[0]} image features "
                             f"for {ids.shape[0]} rows")
        if self.device.type == "cuda":  # a blocking copy would wait here for the vision tower to finish
            where = where.pin_memory().to(self.device, non_blocking=True)
        return embeds.index_copy(1, where, features.view(ids.shape[0], where.numel(), -1)), deepstack, where

    def _own_prefill(self, h: torch.Tensor, position_ids: torch.Tensor, deepstack: Sequence[torch.Tensor] = (),
                     where: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The prompt through every layer into the KV buffers (deepstack feature ``i`` added at the image
        positions ``where`` after layer ``i``); returns the first new token per row."""
        batch, length, _ = h.shape
        cos, sin = self.lm.rotary_emb(h, position_ids)
        for i, layer in enumerate(self.lm.layers):
            h = self._prefill_fn(layer, self._rope, h, cos, sin, self.k[i, :batch, :, :length],
                                 self.v[i, :batch, :, :length])
            if i < len(deepstack):
                h = add_deepstack_at(h, where, deepstack[i])
        return self._first(self.head(self.lm.norm(h[:, -1:]))[:, -1])

    def _first(self, logits: torch.Tensor) -> torch.Tensor:
        """The first new token per row (constrained with nothing generated yet)."""
        if self.constraints is not None:
            logits = self.constraints.apply(logits, self.out[:logits.shape[0]], 0)
        return logits.argmax(-1)

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, Any], max_new_tokens: int,
                 while_busy: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """New token ids for one batch; ``while_busy`` (if given) is called once, after the vision tower
        and the prefill have been queued on the device and before decoding starts."""
        ids, grid = self._check_batch(inputs)
        ids, grid = ids.cpu(), grid.cpu()  # host copies (the processor's already are): no GPU waits later
        batch, length = ids.shape
        mm = inputs.get("mm_token_type_ids")
        # rotary positions of the shared layout, from one row (the model's own function)
        pos1, _ = self.inner.get_rope_index(
            input_ids=ids[:1], mm_token_type_ids=None if mm is None else mm[:1].cpu(),
            image_grid_thw=grid[:1], attention_mask=None)
        position_ids = pos1.to(self.device).expand(3, batch, length)
        next_pos = int(pos1.max()) + 1

        compute_dtype = self.head.weight.dtype if self.head.weight.is_floating_point() else torch.bfloat16
        kwargs = {}
        for key, value in inputs.items():
            if key in ("attention_mask", "labels"):
                continue
            if torch.is_tensor(value):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.inner.visual.dtype if key == "pixel_values" else compute_dtype)
            kwargs[key] = value

        model = self._model()
        was_training = model.training
        model.eval()
        try:
            bp = _bucket(batch, self.max_batch)
            # under autocast (validation inside training) the step runs eagerly: autocast's cast cache
            # and graph capture do not mix
            use_graph = self.cuda_graphs and max_new_tokens > 1 and not torch.is_autocast_enabled("cuda")
            if self.prefill == "own":
                attn0 = self.lm.layers[0].self_attn
                embeds, deepstack, where = self._prompt_embeddings(kwargs, ids, grid)
                self._ensure_capacity(length, max_new_tokens, embeds.dtype,
                                      attn0.k_proj.out_features // attn0.head_dim, attn0.head_dim)
                graph = self._graph(bp) if use_graph else None
                first = self._own_prefill(embeds, position_ids, deepstack, where)
            else:
                out = self.inner(position_ids=position_ids, use_cache=True, **kwargs)
                cache = out.cache
                k0 = cache.layers[0].keys
                self._ensure_capacity(length, max_new_tokens, k0.dtype, k0.shape[1], k0.shape[3])
                first = self._first(self.head(out.last_hidden_state[:, -1]))
                graph = self._graph(bp) if use_graph else None
                for i, layer in enumerate(cache.layers):
                    self.k[i, :batch, :, :length].copy_(layer.keys)
                    self.v[i, :batch, :, :length].copy_(layer.values)
                del out, cache
            self.tok[:batch, 0].copy_(first)
            self.out[:batch, 0].copy_(first)
            self.slot.fill_(length)
            self.pos.fill_(next_pos)
            self.step_idx.fill_(1)
            if while_busy is not None:
                while_busy()
            eos = torch.tensor(self.eos, device=self.device) if self.eos else None
            for step in range(1, max_new_tokens):
                if graph is not None:
                    graph.replay()
                else:
                    self._step(bp)
                if eos is not None and step % 8 == 0 and bool(torch.isin(self.out[:batch, :step + 1], eos)
                                                              .any(1).all()):
                    max_new_tokens = step + 1
                    break
            tokens = self.out[:batch, :max_new_tokens].clone()
        finally:
            if was_training:
                model.train()
        if eos is not None:  # pad after each row's first end token, as HF greedy decoding does
            ended = torch.isin(tokens, eos).long().cumsum(1)
            after = (ended - torch.isin(tokens, eos).long()) > 0
            tokens = tokens.masked_fill(after, self.pad)
        return tokens

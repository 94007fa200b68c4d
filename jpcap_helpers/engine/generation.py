"""One batch of images → captions' raw text: the processor's inputs (optionally prepared on the GPU,
on a side stream), the greedy generation config, and the decoder — the fast greedy decoder
(:mod:`.decode`) for Qwen2-VL / Qwen2.5-VL / Qwen3-VL, else HF ``generate``."""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

from ..models import ModelEntry
from . import decode
from .options import EngineOptions
from .prompts import tokenizer_of

__all__ = ["GPU_IMAGE_PROCESSORS", "model_device_dtype", "generation_config", "prepare_inputs", "uses_fast_decoder",
           "Decoder", "generate_batch"]

# image processors whose preprocessing runs on the GPU (torchvision-based Qwen processors)
GPU_IMAGE_PROCESSORS = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast")


def model_device_dtype(model: Any) -> tuple[Any, Any]:
    """Where inputs go and the float dtype pixel values take (a 4-bit model reports its compute dtype)."""
    import torch

    device = getattr(model, "device", None)
    dtype = getattr(model, "dtype", None)
    if device is None or dtype is None or not dtype.is_floating_point:
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        if device is None:
            device = first.device if first is not None else torch.device("cpu")
        if dtype is None or not dtype.is_floating_point:
            dtype = first.dtype if first is not None else torch.float32
    return device, dtype


def generation_config(model: Any, max_new_tokens: int, num_beams: int, eos: list[int], pad: Optional[int]) -> Any:
    """Greedy (or beam) decoding: the model's generation config with sampling and logit rewriting off."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    cfg.do_sample = False
    for key in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(cfg, key):
            setattr(cfg, key, None)
    cfg.repetition_penalty = None
    cfg.no_repeat_ngram_size = None
    cfg.max_new_tokens = max_new_tokens
    cfg.max_length = None
    cfg.num_beams = num_beams
    cfg.num_return_sequences = 1
    cfg.eos_token_id = eos or None
    cfg.pad_token_id = pad
    return cfg


_SIDE_STREAMS: dict = {}  # one side CUDA stream per device (a cache, made on first use)


def _side_stream(device: Any) -> Any:
    import torch

    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


def prepare_inputs(processor: Any, prompts: list[str], images: list, device: Any = None) -> Any:
    """The processor's tensors for one batch (left-padded when lengths differ); with ``device`` the
    image processor resizes, normalises and patchifies there (the torchvision-based Qwen processors)."""
    tok = tokenizer_of(processor)
    if getattr(tok, "padding_side", "left") != "left":
        tok.padding_side = "left"
    kwargs = {"device": str(device)} if device is not None else {}
    if device is not None and str(device).startswith("cuda"):
        import torch

        # Image copies from pinned memory are asynchronous (a blocking copy would make this thread wait
        # for all the work queued on the GPU; the rest of the Qwen image processor makes none per batch:
        # its normalisation constants are made once per process). The kernels go to a side stream,
        # ordered after the work already queued (which may have produced the images), so that they
        # overlap the current batch's decoding; the current stream waits for the results.
        consumer = torch.cuda.current_stream(device)
        side = _side_stream(torch.device(device))
        side.wait_stream(consumer)  # inputs made on the current stream before this call
        with torch.cuda.stream(side):
            images = [im.to(device, non_blocking=True) if torch.is_tensor(im) else im for im in images]
            inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt", **kwargs)
        consumer.wait_stream(side)
        for value in inputs.values():
            if torch.is_tensor(value) and value.is_cuda:
                value.record_stream(consumer)  # the allocator keeps it until the consumer is done
    else:
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt", **kwargs)
    inputs.pop("labels", None)  # PaliGemmaProcessor still returns labels (BC); generate must not get them
    return inputs


def uses_fast_decoder(model: Any, entry: ModelEntry, num_beams: int, decoder: str) -> bool:
    """Whether :class:`Decoder` decodes with the fast greedy decoder (batches of one visual grid)."""
    if decoder not in ("auto", "hf"):
        raise ValueError(f"decoder must be 'auto' or 'hf', got {decoder!r}")
    return decoder == "auto" and decode.supports(model, entry.family, num_beams)


class Decoder:
    """One batch of processor inputs → new token ids: the fast greedy decoder (:mod:`.decode`) for
    Qwen2-VL / Qwen2.5-VL / Qwen3-VL with ``decoder="auto"``, else HF ``generate`` with ``gen_cfg``."""

    def __init__(self, model: Any, entry: ModelEntry, gen_cfg: Any, batch_size: int, decoder: str,
                 options: EngineOptions = EngineOptions(), constraints: Any = None):
        self.model, self.gen_cfg = model, gen_cfg
        self.constraints = constraints if constraints is not None and constraints.active else None
        self.fast = None
        if uses_fast_decoder(model, entry, gen_cfg.num_beams, decoder):
            eos = gen_cfg.eos_token_id or []
            compile_prefill = options.compile_prefill
            if compile_prefill is None:  # where load_model compiled the vision tower, for a plain model
                compile_prefill = (bool(getattr(model, "jpcap_compile", False)) and not hasattr(model, "peft_config")
                                   and not decode.has_4bit(model))
            settings = dict(eos_ids=eos if isinstance(eos, list) else [eos], pad_id=gen_cfg.pad_token_id,
                            max_batch=batch_size, compile_prefill=compile_prefill,
                            compile_step=compile_prefill and options.compile_step)
            if options.reuse_decoder and self.constraints is None:
                self.fast = _kept_decoder(model, settings)
            else:
                self.fast = decode.GreedyDecoder(model, constraints=self.constraints, **settings)
        self.name = "static-cache greedy" if self.fast is not None else "hf generate"
        self.preprocess_device = None
        if self.fast is not None and self.fast.device.type == "cuda" and options.preprocess_on_gpu:
            self.preprocess_device = self.fast.device

    def __call__(self, inputs: Any, while_busy: Optional[Callable[[], None]] = None) -> Any:
        """New token ids; the fast decoder calls ``while_busy`` while the GPU works on the prefill (HF
        generate does not: the caller runs it afterwards)."""
        import torch

        if self.fast is not None:
            return self.fast.generate(inputs, self.gen_cfg.max_new_tokens, while_busy=while_busy)
        device, dtype = model_device_dtype(self.model)
        moved = {}
        for key, value in inputs.items():
            if torch.is_tensor(value):
                value = value.to(device)
                if value.is_floating_point():
                    value = value.to(dtype)
            moved[key] = value
        extra = {}
        if self.constraints is not None:
            from transformers import LogitsProcessorList

            from .constraints import ConstraintProcessor
            extra["logits_processor"] = LogitsProcessorList(
                [ConstraintProcessor(self.constraints, moved["input_ids"].shape[1])])
        with torch.no_grad():  # not inference_mode: the trainer goes on training this model afterwards
            out = self.model.generate(**moved, generation_config=self.gen_cfg, **extra)
        return out[:, moved["input_ids"].shape[1]:]


def _weights_fingerprint(model: Any) -> tuple:
    """Which modules and which weight storage ``model`` has now: a swapped module (an adapter injected or
    unloaded), a moved, converted or replaced weight changes it; weights updated in place do not."""
    return (tuple(id(m) for m in model.modules()), tuple(p.data_ptr() for p in model.parameters()))


class _KeptDecoder:
    """The fast decoder kept on a model (``model._jpcap_greedy_decoder``) with the key it was made for; a
    copy of the model gets none (no second set of buffers and graphs)."""

    def __init__(self, key: Any = None, decoder: Any = None):
        self.key, self.decoder = key, decoder

    def __deepcopy__(self, memo: dict) -> "_KeptDecoder":
        return _KeptDecoder()


def _kept_decoder(model: Any, settings: dict) -> "decode.GreedyDecoder":
    """The fast decoder kept on ``model`` from an earlier call with these settings and the same weights
    (its buffers and captured graphs reused), else a new one, kept in its place (one per model)."""
    key = (repr(sorted(settings.items())), _weights_fingerprint(model))
    kept = model.__dict__.get("_jpcap_greedy_decoder")
    if kept is not None and kept.key == key:
        return kept.decoder
    model.__dict__.pop("_jpcap_greedy_decoder", None)   # its buffers go before new ones are allocated
    fast = decode.GreedyDecoder(model, **settings)
    model.__dict__["_jpcap_greedy_decoder"] = _KeptDecoder(key, fast)
    return fast


def generate_batch(processor: Any, inputs: Any, decoder: Decoder,
                   while_busy: Optional[Callable[[], None]] = None) -> list[str]:
    """Raw decoded continuations (new tokens only) for one batch of processor inputs; raises on failure."""
    new_tokens = decoder(inputs, while_busy)
    return tokenizer_of(processor).batch_decode(new_tokens.cpu(), skip_special_tokens=True,
                                                clean_up_tokenization_spaces=False)

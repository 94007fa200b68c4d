"""Model registry (hub ids, pinned revisions, prompts, licences, STAIR contamination) and the offline
tiny Qwen2-VL factory. The tiny model is built with the real transformers classes from a config, a
byte-level BPE tokenizer trained on the toy captions (with Qwen2-VL's special tokens and chat
template) and the real Qwen2-VL image processor, then saved so ``from_pretrained`` loads it exactly as
it loads a hub checkpoint: both faces of the project share one code path.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

# Qwen2-VL-2B-Instruct's own chat template (chat_template.json of the hub repo).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Special tokens in Qwen2-VL's order (their ids follow the ordinary vocabulary, as in the real one).
QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

CAPTION_PROMPT_JA = "この画像を日本語の一文で説明してください。"


@dataclass(frozen=True)
class ModelEntry:
    """One row of the registry. ``loader`` says how the model loads; ``family`` picks prompt building."""
    key: str
    hub_id: str
    revision: Optional[str]              # None: no hub here to read a commit from; the engine records the
                                         # commit actually loaded (config._commit_hash) as provenance
    family: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "llava_jp", "asagi", "stable_vlm"]
    loader: Literal["native", "remote_code"]
    params_b: float                      # parameters, billions (for the results table)
    prompt: str
    licence: str
    trained_on_stair: Optional[bool]     # True: STAIR in its training data, so not zero-shot on STAIR
    contamination_note: str
    t4_recipe: str
    max_new_tokens: int = 40
    run_here: str = "not run here (no hub access)"
    notes: str = ""


REGISTRY: dict[str, ModelEntry] = {}


def _register(entry: ModelEntry) -> None:
    REGISTRY[entry.key] = entry


_register(ModelEntry(
    key="tiny-qwen2-vl", hub_id="(built locally)", revision=None, family="qwen2_vl", loader="native",
    params_b=0.0, prompt=CAPTION_PROMPT_JA, licence="Apache-2.0 (this project)", trained_on_stair=False,
    contamination_note="random init, trained here only on synthetic jp-shapes",
    t4_recipe="fp32 on CPU; any", run_here="built, trained and evaluated offline in tests and the demo",
    notes="Qwen2-VL architecture at toy size; its captions mean nothing before fine-tuning.",
))
_register(ModelEntry(
    key="qwen2-vl-2b-instruct", hub_id="Qwen/Qwen2-VL-2B-Instruct",
    revision=None, family="qwen2_vl", loader="native", params_b=2.2,
    prompt=CAPTION_PROMPT_JA, licence="Apache-2.0", trained_on_stair=None,
    contamination_note="training data undisclosed; STAIR use unknown",
    t4_recipe="fp16 (T4 has no bf16), or 4-bit NF4 for QLoRA; vision tower kept fp16",
    run_here=("tiny config: load + batched generate in tests; real shape (random weights): training, "
              "fp16 and generation benchmarked on an H100; no real checkpoint (no hub)"),
))
_register(ModelEntry(
    key="qwen2.5-vl-3b-instruct", hub_id="Qwen/Qwen2.5-VL-3B-Instruct",
    revision=None, family="qwen2_5_vl", loader="native", params_b=3.8,
    prompt=CAPTION_PROMPT_JA, licence="Qwen Research License (non-commercial)", trained_on_stair=None,
    contamination_note="training data undisclosed; STAIR use unknown",
    t4_recipe="fp16 or 4-bit NF4",
    run_here=("tiny config: load + batched generate in tests; real shape (random "
              "weights): training benchmarked on an H100; no real checkpoint"),
))
_register(ModelEntry(
    key="qwen3-vl-2b-instruct", hub_id="Qwen/Qwen3-VL-2B-Instruct", revision=None, family="qwen3_vl",
    loader="native", params_b=2.1, prompt=CAPTION_PROMPT_JA, licence="Apache-2.0", trained_on_stair=None,
    contamination_note="training data undisclosed; STAIR use unknown",
    t4_recipe="fp16 or 4-bit NF4",
    run_here=("tiny config: load + batched generate in tests; fine-tuning not "
              "supported yet (deepstack); no real checkpoint"),
))
_register(ModelEntry(
    key="paligemma-3b", hub_id="google/paligemma-3b-mix-224", revision=None, family="paligemma",
    loader="native", params_b=2.9, prompt="caption ja", licence="Gemma Terms of Use (gated)",
    trained_on_stair=None, contamination_note="mix checkpoint fine-tuned on multilingual COCO-35L captions "
    "(COCO images, machine-translated captions), not STAIR itself",
    t4_recipe="fp16", max_new_tokens=40,
    notes="gated on the hub: accept the licence and log in first; the processor adds <image> tokens, "
    "BOS and the closing newline around the 'caption ja' prefix itself",
    run_here='tiny config: load + batched generate in tests; no real checkpoint'))
_register(ModelEntry(
    key="llava-jp-1.3b", hub_id="toshi456/llava-jp-1.3b-v1.1", revision=None, family="llava_jp",
    loader="remote_code", params_b=1.86,
    prompt="これは好奇心旺盛なユーザーと人工知能システムのチャットです。システムはユーザーの質問に親切、詳細、丁寧に答える。"
    " ユーザー: <image>\nこの画像を日本語の一文で説明してください。 システム: ",
    licence="CC-BY-NC-4.0", trained_on_stair=False,
    contamination_note="v1.1 trained on LLaVA-Pretrain-JA + LLaVA-v1.5-Instruct-620K-JA (no STAIR; v1.0 "
    "used STAIR). The instruction data covers COCO train2017 images, which include most val2014 "
    "images: images seen with other (translated) text, not STAIR captions",
    t4_recipe="fp16", notes="needs the LLaVA-JP code base (github.com/tosiyuki/LLaVA-JP), not transformers classes",
    run_here=("not run here: prompt building and output cleaning tested; captioning "
              "needs its own remote code (not built)"),
))
_register(ModelEntry(
    key="asagi-2b", hub_id="MIL-UT/Asagi-2B", revision=None, family="asagi", loader="remote_code",
    params_b=2.3, prompt="以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n"
    "### 指示:\n<image>\nこの画像を日本語の一文で説明してください。\n\n### 応答:\n",
    licence="Apache-2.0", trained_on_stair=True,
    contamination_note="STAIR Captions reported in Asagi's training data (model card training-data "
    "table; YJ Captions reportedly too) — not zero-shot on STAIR or YJ",
    t4_recipe="fp16", notes="model card pins transformers 4.45.1 (remote code)",
    run_here=("not run here: prompt building and output cleaning tested; captioning "
              "needs its own remote code (not built)"),
))
_register(ModelEntry(
    key="japanese-stable-vlm", hub_id="stabilityai/japanese-stable-vlm", revision=None, family="stable_vlm",
    loader="remote_code", params_b=7.6, prompt="以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。"
    "要求を適切に満たす応答を書きなさい。\n\n### 指示: \n画像を詳細に述べてください。\n\n### 応答: \n",
    licence="Japanese Stable VLM Research License (non-commercial, gated)", trained_on_stair=True,
    contamination_note="trained on Japanese captions incl. STAIR (model card) — not zero-shot on STAIR",
    t4_recipe="4-bit NF4 only (7B language model does not fit a T4 in fp16)",
    notes="prompt = model card build_prompt(task='caption'); an instruction override uses task='vqa'",
    run_here=("not run here: prompt building and output cleaning tested; captioning "
              "needs its own remote code (not built)"),
))


class ModelError(ValueError):
    """A model name or option is not usable; the message says what to do."""


def resolve(name: str, trust_remote_code: bool = False) -> ModelEntry:
    """Registry entry for ``name`` (a key, a hub id, or a local folder with a config.json)."""
    if name in REGISTRY:
        entry = REGISTRY[name]
    else:
        matches = [e for e in REGISTRY.values() if e.hub_id == name]
        if matches:
            entry = matches[0]
        elif (Path(name) / "config.json").is_file():
            model_type = json.loads((Path(name) / "config.json").read_text()).get("model_type", "qwen2_vl")
            family = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "paligemma": "paligemma"}.get(
                model_type, "qwen2_vl")
            entry = ModelEntry(key=name, hub_id=name, revision=None, family=family, loader="native",
                               params_b=0.0, prompt=CAPTION_PROMPT_JA, licence="(local)",
                               trained_on_stair=None, contamination_note="local model", t4_recipe="")
        else:
            raise ModelError(f"unknown model {name!r}: use a registry key ({', '.join(REGISTRY)}) "
                             "or a local folder holding config.json")
    if entry.loader == "remote_code" and not trust_remote_code:
        raise ModelError(f"{entry.key} ({entry.hub_id}) runs code from its hub repository: set "
                         "model.trust_remote_code: true in your params file to opt in for it")
    return entry


def registry_table():
    """The registry as a DataFrame (the README's model table comes from it)."""
    import pandas as pd
    rows = [dict(model=e.key, hub_id=e.hub_id, revision=e.revision or "(unpinned)", loads=e.loader,
                 params_b=e.params_b, licence=e.licence,
                 trained_on_stair={True: "yes", False: "no", None: "unknown"}[e.trained_on_stair],
                 t4=e.t4_recipe, run_here=e.run_here) for e in REGISTRY.values()]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# tiny offline model
# ---------------------------------------------------------------------------------------------

def train_tiny_tokenizer(texts: list[str], vocab_size: int = 1200):
    """A byte-level BPE tokenizer trained on ``texts`` with Qwen2-VL's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Japanese has no spaces, so unbounded merges would learn whole captions as single tokens; six
    # byte-level symbols = at most two kana/kanji per token, close to what Qwen's real vocabulary does.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  max_token_length=6, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    scaffold = ["system", "user", "assistant", "You are a helpful assistant.", CAPTION_PROMPT_JA]
    tok.train_from_iterator(texts + scaffold * 50, trainer=trainer)
    tok.add_special_tokens(QWEN2_VL_SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=QWEN2_VL_SPECIAL_TOKENS[1:],
        model_max_length=32768, padding_side="left", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return fast


def tiny_config(tok, spec) -> "object":
    """A Qwen2VLConfig at toy size whose special-token ids match ``tok``."""
    from transformers import Qwen2VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_attention_heads
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=4096,
                rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_embed_dim, num_heads=spec.vision_num_heads,
                  mlp_ratio=2, hidden_size=spec.hidden_size, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"])


def build_tiny_model(out_dir: str | Path, caption_texts: list[str], spec=None, min_pixels: int = 56 * 56,
                     max_pixels: int = 448 * 448, overwrite: bool = False) -> Path:
    """Build (or reuse) the tiny Qwen2-VL in ``out_dir``: config, random weights, tokenizer, processor."""
    import hashlib

    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    from .params import TinyModelParams

    spec = spec or TinyModelParams()
    out_dir = Path(out_dir)
    import dataclasses
    fingerprint = hashlib.sha256(json.dumps(
        [dataclasses.asdict(spec), min_pixels, max_pixels, sorted(set(caption_texts))],
        ensure_ascii=False).encode()).hexdigest()[:12]
    stamp = out_dir / "jpcap_tiny.json"
    if not overwrite and stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return out_dir

    tok = train_tiny_tokenizer(caption_texts, spec.tokenizer_vocab_size)
    cfg = tiny_config(tok, spec)
    torch.manual_seed(spec.seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = [cfg.text_config.eos_token_id]
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    model.generation_config.do_sample = False
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    try:
        from transformers import Qwen2VLVideoProcessor
        video_processor = Qwen2VLVideoProcessor()
    except Exception:  # video processing needs torchvision; captions never use it
        video_processor = None
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                                 video_processor=video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    from .io import atomic_write_json
    atomic_write_json(stamp, {"fingerprint": fingerprint, "spec": dataclasses.asdict(spec),
                              "n_parameters": sum(p.numel() for p in model.parameters())})
    return out_dir


def model_path(params, name: Optional[str] = None) -> str:
    """Where ``from_pretrained`` should load ``name`` from: the tiny model's folder or a hub id."""
    name = name or params.model.name
    if name == "tiny-qwen2-vl":
        return str(Path(params.model.models_dir) / "tiny-qwen2-vl")
    entry = resolve(name, trust_remote_code=params.model.trust_remote_code)
    return entry.hub_id if entry.hub_id != name or not Path(name).exists() else name


def ensure_tiny_model(params) -> Path:
    """Build the tiny model for ``params`` (its tokenizer learns the jp-shapes captions)."""
    from .toydata import all_caption_texts

    texts = all_caption_texts(params.data.root)
    if not texts:
        raise ModelError(f"no jp-shapes captions under {params.data.root}: run 01_data (or "
                         "`jpcap run --only 01`) before building the tiny model")
    return build_tiny_model(model_path(params, "tiny-qwen2-vl"), texts, params.model.tiny,
                            params.model.min_pixels, params.model.max_pixels)


# ---------------------------------------------------------------------------------------------
# precision and loading (shared by the caption engine and the trainer)
# ---------------------------------------------------------------------------------------------

def choose_dtype(precision: str = "auto"):
    """torch dtype for ``precision``: auto → bf16 where the GPU supports it, fp16 on older GPUs
    (e.g. a T4, which has no bf16 — Qwen is fp16-fragile, so the trainer guards against inf/NaN),
    fp32 on CPU. An explicit choice the hardware cannot run is an error, not a silent fallback."""
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if bf16_ok else (torch.float16 if cuda else torch.float32)
    if precision == "bf16":
        if cuda and not bf16_ok:
            raise ModelError("model.precision: bf16 requested but this GPU has no bf16 (a T4?): use fp16 or auto")
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "fp32":
        return torch.float32
    raise ModelError(f"model.precision: unknown value {precision!r}")


# transformers 5 matches skip patterns from the start of the module name or as a suffix: "visual"
# alone does NOT match "model.visual.*" and the vision tower would silently be quantized.
SKIP_QUANT_MODULES = ["model.visual", "visual", "lm_head"]


def quantization_config(compute_dtype):
    """4-bit NF4 with double quantization; the vision tower and lm_head stay unquantized."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=SKIP_QUANT_MODULES)


def cpu_safe_4bit(model) -> int:
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


def load_processor(params, name: Optional[str] = None):
    """The model's processor; Qwen families get ``model.min_pixels``/``max_pixels`` as their image size
    bounds (PaliGemma and others keep their own fixed input size)."""
    from transformers import AutoProcessor

    name = name or params.model.name
    entry = resolve(name, trust_remote_code=params.model.trust_remote_code)
    revision = params.model.revision or entry.revision
    kwargs: dict = {"revision": revision} if revision else {}
    if entry.loader == "remote_code":
        kwargs["trust_remote_code"] = True
    if entry.family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        kwargs["size"] = {"shortest_edge": params.model.min_pixels, "longest_edge": params.model.max_pixels}
    return AutoProcessor.from_pretrained(model_path(params, name), **kwargs)


def load_model(params, name: Optional[str] = None, *, load_in_4bit: Optional[bool] = None,
               adapter: Optional[str] = None, for_training: bool = False):
    """(model, processor, entry) for ``name`` per ``params.model``: precision per GPU, optional 4-bit
    NF4 (vision tower never quantized), optional PEFT adapter. Native transformers classes only;
    remote-code models need ``model.trust_remote_code: true``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = name or params.model.name
    entry = resolve(name, trust_remote_code=params.model.trust_remote_code)
    if entry.key == "tiny-qwen2-vl":
        ensure_tiny_model(params)
    path = model_path(params, name)
    revision = params.model.revision or entry.revision
    dtype = choose_dtype(params.model.precision)
    quant = params.model.load_in_4bit if load_in_4bit is None else load_in_4bit
    kwargs: dict = {"dtype": dtype}
    if revision:
        kwargs["revision"] = revision
    if entry.loader == "remote_code":
        kwargs["trust_remote_code"] = True
    if params.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = params.model.attn_implementation
    if quant:
        kwargs["quantization_config"] = quantization_config(dtype if dtype != torch.float32 else torch.float32)
        # one GPU per process: under accelerate/torchrun each rank loads onto its own device
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if quant and not torch.cuda.is_available():
        cpu_safe_4bit(model)
    from .fastpath import compile_blocks, compile_supported, use_batched_vision_attention, use_linear_patch_embed
    use_linear_patch_embed(model)
    use_batched_vision_attention(model)  # one attention call per run of equal-size images
    visual = getattr(getattr(model, "model", None), "visual", None)
    compiled = bool(params.model.compile and compile_supported(model.config.model_type) and hasattr(visual, "blocks"))
    if compiled:
        compile_blocks(visual.blocks)  # the ViT is frozen: compiled for captioning and training alike
    if not quant and torch.cuda.is_available():
        model = model.to(f"cuda:{torch.cuda.current_device()}")
    processor = load_processor(params, name)
    processor.tokenizer.padding_side = "left"
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter, is_trainable=for_training)
        if not for_training and not quant:
            # inference on a full-precision base: fold LoRA into the weights (faster generation,
            # benchmarks/RESULTS.md); on a 4-bit base merging would change outputs, so it stays separate
            model = model.merge_and_unload()
    if not for_training:
        model.eval()
    model.jpcap_commit = getattr(model.config, "_commit_hash", None)
    model.jpcap_compile = compiled  # the caption engine compiles its prefill likewise
    return model, processor, entry


def load_tokenizer(params, name: Optional[str] = None):
    """The model's tokenizer (what ``data.max_caption_tokens`` counts); builds the tiny model offline."""
    from transformers import AutoTokenizer

    name = name or params.model.name
    entry = resolve(name, trust_remote_code=params.model.trust_remote_code)
    if entry.key == "tiny-qwen2-vl":
        ensure_tiny_model(params)
    revision = params.model.revision or entry.revision
    kwargs = {"revision": revision} if revision else {}
    if entry.loader == "remote_code":
        kwargs["trust_remote_code"] = True
    return AutoTokenizer.from_pretrained(model_path(params, name), **kwargs)

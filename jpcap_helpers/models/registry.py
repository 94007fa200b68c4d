"""The model registry: one :class:`ModelEntry` per model the notebooks can run (hub id, pinned revision,
family, loader, licence, STAIR contamination, T4 recipe), and the family → module map.

Each entry's ``family`` names the module that knows that family's inputs and outputs
(:data:`FAMILY_MODULES`; :func:`family_module` imports it). A family module provides:

* ``build_prompt(entry, processor, instruction) -> str`` — the text prompt for one image;
* ``ANSWER_MARKER`` (regex or None) — the answer is the text after its last match;
* ``ECHO`` (regex or None) — a prompt echo removed once from the start of the answer;
* ``STOP_PATTERNS`` (regexes) — where a next turn starts; ``STOP_TOKENS`` — end-of-turn tokens;
* ``processor_kwargs(params) -> dict`` — extra ``AutoProcessor.from_pretrained`` arguments.

A new family (e.g. a loader for a remote-code baseline) is a new module plus one line in
:data:`FAMILY_MODULES`.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal, Optional

from .pinned_env import PinnedRecipe

__all__ = ["CAPTION_PROMPT_JA", "ModelEntry", "ModelError", "REGISTRY", "FAMILY_MODULES", "FINETUNE_FAMILIES",
           "family_module", "resolve", "finetunable", "registry_table", "contamination_flag"]

CAPTION_PROMPT_JA = "この画像を日本語の一文で説明してください。"


class ModelError(ValueError):
    """A model name or option is not usable; the message says what to do."""


@dataclass(frozen=True)
class ModelEntry:
    """One row of the registry. ``loader`` says how the model loads; ``family`` picks prompt building."""
    key: str
    hub_id: str
    revision: Optional[str]              # None: no commit known here (no hub to read one from); the engine
                                         # records the commit actually loaded (config._commit_hash). A
                                         # remote-code entry without one is refused unless the user pins
                                         # model.revision or sets model.allow_unpinned_remote_code
    family: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "llava_jp", "asagi", "stable_vlm"]
    loader: Literal["native", "pinned_env"]  # pinned_env: its hub code, in its own pinned environment
                                             # (models/pinned_env.py), after an explicit opt-in
    params_b: float                      # parameters, billions (for the results table)
    prompt: str
    licence: str
    trained_on_stair: Optional[bool]     # True: STAIR in its training data, so not zero-shot on STAIR
    contamination_note: str
    t4_recipe: str
    max_new_tokens: int = 40
    card_generation: Optional[dict] = None  # the model card's own generation settings (recorded beside
                                            # the project's greedy default in each run's provenance)
    load_in_4bit: Optional[bool] = None  # zero-shot captioning in 4 bit? None: as model.load_in_4bit
    pinned: Optional[PinnedRecipe] = None  # how it runs in a pinned environment (required for pinned_env;
                                           # a fallback for others with model.loads: pinned_env)
    gated: bool = False                  # the hub asks for an accepted licence and a login (HF token)
    run_here: str = "not run here (no hub access)"
    notes: str = ""


# family (ModelEntry.family) → module of this package holding its prompt, cleaning and processor bits
FAMILY_MODULES: dict[str, str] = {
    "qwen2_vl": "qwen_vl", "qwen2_5_vl": "qwen_vl", "qwen3_vl": "qwen_vl",
    "paligemma": "paligemma",
    "llava_jp": "llava_jp",
    "asagi": "asagi",
    "stable_vlm": "stable_vlm",
}


# the families 03 can fine-tune: the training fast path (train/lora.py) is tested equal to transformers'
# forward for these; every other family captions zero-shot only
FINETUNE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def family_module(family: str) -> ModuleType:
    """The module of ``family`` (see the module docstring for what it provides)."""
    if family not in FAMILY_MODULES:
        raise ModelError(f"no module for model family {family!r} (known: {', '.join(FAMILY_MODULES)})")
    return importlib.import_module(f"{__package__}.{FAMILY_MODULES[family]}")


REGISTRY: dict[str, ModelEntry] = {}


def _register(entry: ModelEntry) -> None:
    REGISTRY[entry.key] = entry


_register(ModelEntry(
    key="tiny-qwen2-vl", hub_id="(built locally)", revision=None, family="qwen2_vl", loader="native",
    params_b=0.0, prompt=CAPTION_PROMPT_JA, licence="Apache-2.0 (this project)", trained_on_stair=False,
    contamination_note=("built here; with model.tiny.pretrain_steps > 0 pretrained here on another caption "
                        "style of the toy world (fresh images, no jp-shapes image or template), else random init"),
    t4_recipe="fp32 on CPU; any", run_here="built, pretrained, trained and evaluated offline in tests and the demo",
    notes=("Qwen2-VL architecture at toy size; pretrained (smoke.yaml) its zero-shot captions name shapes and "
           "colours in the wrong style, random-init they mean nothing before fine-tuning."),
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
    run_here=("tiny config: load + batched generate in tests; fine-tuning (LoRA, QLoRA, packing; window-ordered "
              "vision tower) tested equal to transformers on tiny random weights (CPU); real shape (random weights, "
              "H200, 2026-11-29): compiled = eager losses, compiled QLoRA 11.6x the cookbook at micro-batch 8, fast "
              "decoder 122 images/s; no real checkpoint (no hub)"),
))
_register(ModelEntry(
    key="qwen3-vl-2b-instruct", hub_id="Qwen/Qwen3-VL-2B-Instruct", revision=None, family="qwen3_vl",
    loader="native", params_b=2.1, prompt=CAPTION_PROMPT_JA, licence="Apache-2.0", trained_on_stair=None,
    contamination_note="training data undisclosed; STAIR use unknown",
    t4_recipe="fp16, or 4-bit NF4 for QLoRA (params/colab_t4_qwen3.yaml; T4 time estimated)",
    run_here=("tiny config: load + batched generate in tests; fine-tuning (LoRA, QLoRA, packing; deepstack "
              "mergers in the projector) and the fast greedy decoder tested equal to transformers on tiny "
              "random weights (CPU) and on the real shape with random weights (H200, 2026-11-29); speed measured "
              "there (compiled QLoRA 2.9–8.9× the cookbook, fast decoder 147 images/s; fp16 training run); "
              "no real checkpoint (no hub)"),
))
_register(ModelEntry(
    key="paligemma-3b", hub_id="google/paligemma-3b-mix-224", revision=None, family="paligemma",
    loader="native", params_b=2.9, prompt="caption ja", licence="Gemma Terms of Use (gated)",
    trained_on_stair=None, contamination_note="mix checkpoint fine-tuned on multilingual COCO-35L captions "
    "(COCO images, machine-translated captions), not STAIR itself",
    t4_recipe="fp16", max_new_tokens=40, gated=True, load_in_4bit=False,
    notes="gated on the hub: accept the licence and log in first; the processor adds <image> tokens, "
    "BOS and the closing newline around the 'caption ja' prefix itself",
    run_here='tiny config: load + batched generate in tests; no real checkpoint'))
_register(ModelEntry(
    key="llava-jp-1.3b", hub_id="toshi456/llava-jp-1.3b-v1.1", revision=None, family="llava_jp",
    loader="native", params_b=1.86,
    prompt="これは好奇心旺盛なユーザーと人工知能システムのチャットです。システムはユーザーの質問に親切、詳細、丁寧に答える。"
    " ユーザー: <image>\nこの画像を日本語の一文で説明してください。 システム: ",
    licence="CC-BY-NC-4.0", trained_on_stair=False,
    contamination_note="v1.1 trained on LLaVA-Pretrain-JA + LLaVA-v1.5-Instruct-620K-JA (no STAIR; v1.0 "
    "used STAIR). The instruction data covers COCO train2017 images, which include most val2014 "
    "images: images seen with other (translated) text, not STAIR captions",
    t4_recipe="fp16", load_in_4bit=False, notes="ported natively (models/llava_jp_model.py: transformers SiglipVisionModel + "
    "GPT2LMHeadModel + S2 features + image splice); no remote code; the vision tower's config comes from "
    "mm_vision_tower (google/siglip-so400m-patch14-384, cached or a local folder)",
    run_here=("native port: logits checked against an independent reference forward, KV-cached greedy, "
              "batched and engine captioning tested on tiny random weights in the hub layout; "
              "not run on the real checkpoint (no hub here)"),
))
_register(ModelEntry(
    key="asagi-2b", hub_id="MIL-UT/Asagi-2B", revision=None, family="asagi", loader="native",
    params_b=2.3, prompt="以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n"
    "### 指示:\n<image>\nこの画像を日本語の一文で説明してください。\n\n### 応答:\n",
    licence="Apache-2.0", trained_on_stair=True,
    contamination_note="STAIR Captions reported in Asagi's training data (model card training-data "
    "table; YJ Captions reportedly too) — not zero-shot on STAIR or YJ",
    t4_recipe="fp16 (2.3B parameters: ≈ 4.6 GB of weights)", load_in_4bit=False,
    pinned=PinnedRecipe(("transformers==4.45.1", "tokenizers>=0.20,<0.21", "huggingface_hub>=0.24,<1.0"), "auto"),
    card_generation={"do_sample": True, "num_beams": 5, "max_new_tokens": 256, "temperature": 0.7,
                     "repetition_penalty": 1.5},
    notes=("runs on transformers' own LlavaForConditionalGeneration (models/asagi.py): the 4.45 checkpoint "
           "keys are renamed on load; vision feature layer/selection, image token and the <image> expansion "
           "are read from its config.json; no remote code. Its card pins transformers 4.45.1: the pinned-"
           "environment runner (model.loads: pinned_env) is the fallback"),
    run_here=("on native Llava: logits checked against a hand-written 4.45 forward, batched = single and "
              "engine captioning tested on tiny random weights in the 4.45 layout; not run on the real "
              "checkpoint (no hub here)"),
))
_register(ModelEntry(
    key="japanese-stable-vlm", hub_id="stabilityai/japanese-stable-vlm", revision=None, family="stable_vlm",
    loader="pinned_env", params_b=7.6, prompt="以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。"
    "要求を適切に満たす応答を書きなさい。\n\n### 指示: \n画像を詳細に述べてください。\n\n### 応答: \n",
    licence="Japanese Stable VLM Research License (non-commercial, gated)", trained_on_stair=True,
    contamination_note="trained on Japanese captions incl. STAIR (model card) — not zero-shot on STAIR",
    t4_recipe="4-bit NF4 (a 7B language model does not fit a T4 in fp16)", load_in_4bit=True, gated=True,
    pinned=PinnedRecipe(("transformers==4.45.2", "tokenizers>=0.20,<0.21", "huggingface_hub>=0.24,<1.0"),
                        "vision2seq"),
    card_generation={"do_sample": False, "num_beams": 5, "max_new_tokens": 128, "repetition_penalty": 1.5},
    notes=("its hub code (not public elsewhere) targets transformers 4.45: it runs in a pinned environment "
           "(transformers 4.45.2 on top of this interpreter's torch) in a subprocess, only with "
           "model.trust_remote_code naming it and a pinned revision; prompt = model card build_prompt(task="
           "'caption'), an instruction override uses task='vqa'; gated: accept the licence and log in"),
    run_here=("pinned-environment runner tested offline with a tiny custom-code model of this project (and with "
              "transformers 4.45.2 where the package index is reachable); the real model not run (no hub here)"),
))


def resolve(name: str) -> ModelEntry:
    """Registry entry for ``name`` (a key, a hub id, or a local folder with a config.json). Whether a
    pinned-environment model may run its hub code is decided where it runs (``engine.runs``)."""
    if name in REGISTRY:
        entry = REGISTRY[name]
    else:
        matches = [e for e in REGISTRY.values() if e.hub_id == name]
        if matches:
            entry = matches[0]
        elif (Path(name) / "config.json").is_file():
            model_type = json.loads((Path(name) / "config.json").read_text()).get("model_type", "qwen2_vl")
            # a LLaVA-layout folder (model_type "llava") is taken for Asagi (models/asagi.py)
            family = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "paligemma": "paligemma",
                      "llava-jp": "llava_jp", "llava": "asagi"}.get(model_type, "qwen2_vl")
            # a template family's registry prompt is the whole template around the request
            template_of = {"llava_jp": "llava-jp-1.3b", "asagi": "asagi-2b"}
            prompt = REGISTRY[template_of[family]].prompt if family in template_of else CAPTION_PROMPT_JA
            entry = ModelEntry(key=name, hub_id=name, revision=None, family=family, loader="native",
                               params_b=0.0, prompt=prompt, licence="(local)",
                               trained_on_stair=None, contamination_note="local model", t4_recipe="")
        else:
            raise ModelError(f"unknown model {name!r}: use a registry key ({', '.join(REGISTRY)}) "
                             "or a local folder holding config.json")
    return entry


def finetunable(name: str) -> ModelEntry:
    """The entry of ``name`` (as :func:`resolve`) when 03 can fine-tune it: a native model of
    :data:`FINETUNE_FAMILIES`. Raises ModelError saying why not and what to do instead."""
    entry = resolve(name)
    if entry.loader != "native" or entry.family not in FINETUNE_FAMILIES:
        how = "runs in its own pinned environment" if entry.loader != "native" else f"is of family {entry.family}"
        raise ModelError(f"{name!r} {how} and cannot be fine-tuned here (03 trains the "
                         f"{', '.join(FINETUNE_FAMILIES)} families only): caption it zero-shot in 02 "
                         "(zero_shot.models) instead")
    return entry


def registry_table():
    """The registry as a DataFrame (the README's model table comes from it)."""
    import pandas as pd
    rows = [dict(model=e.key, hub_id=e.hub_id, revision=e.revision or "(unpinned)", loads=e.loader,
                 params_b=e.params_b, licence=e.licence,
                 trained_on_stair={True: "yes", False: "no", None: "unknown"}[e.trained_on_stair],
                 t4=e.t4_recipe, run_here=e.run_here) for e in REGISTRY.values()]
    return pd.DataFrame(rows)


def contamination_flag(entry: ModelEntry) -> str:
    """``contaminated`` when STAIR is in the model's training data (STAIR and YJ splits share COCO
    images, so every split of this project is affected), ``clean`` when documented absent,
    ``unknown`` otherwise."""
    return {True: "contaminated", False: "clean", None: "unknown"}[entry.trained_on_stair]

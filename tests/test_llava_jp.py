"""LLaVA-JP v1.1, ported natively (models/llava_jp_model.py), on tiny random weights saved in the hub
layout of toshi456/llava-jp-1.3b-v1.1 (config.json with model_type "llava-jp", safetensors or
pytorch_model.bin, an llm-jp-style tokenizer that appends <EOD|LLM-jp>, a SigLIP config folder named by
mm_vision_tower). The reference forward below is written from the architecture description, not from
the module under test: hand-written GPT-2, transformers' SiglipVisionModel, S2 and the splice by hand."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch.nn import functional as F

from jpcap_helpers import engine
from jpcap_helpers import io as jio
from jpcap_helpers.data import toy as toydata
from jpcap_helpers.models import REGISTRY, ModelError, load_model, resolve
from jpcap_helpers.models.llava_jp_model import IMAGE_TOKEN_INDEX, LlavaJpError, load_llava_jp

SPECIALS = ["<unk|LLM-jp>", "<s|LLM-jp>", "</s|LLM-jp>", "<mask|LLM-jp>", "<pad|LLM-jp>", "<CLS|LLM-jp>",
            "<SEP|LLM-jp>", "<EOD|LLM-jp>"]  # llm-jp's ids 0..7 (EOD = 7 = config bos/eos)
EOD = 7
D, VD, PATCH, TILE = 32, 16, 14, 42  # LM width, SigLIP width; 42/14 = 3×3 = 9 patches → 8 → 2 × 4 grid
ENTRY = REGISTRY["llava-jp-1.3b"]


def _tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk|LLM-jp>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, show_progress=False, max_token_length=6, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="$A <EOD|LLM-jp>",
                                                       special_tokens=[("<EOD|LLM-jp>", EOD)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s|LLM-jp>", eos_token="<EOD|LLM-jp>",
                                   unk_token="<unk|LLM-jp>", pad_token="<unk|LLM-jp>",
                                   clean_up_tokenization_spaces=False)


def _scramble(module, seed, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (std if p.dim() >= 2 else 0.1))


def build_llava_jp(out, texts, tower="siglip"):
    """A tiny LLaVA-JP v1.1 folder in the hub layout; returns its state dict (checkpoint keys)."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    out.mkdir(parents=True)
    tok = _tokenizer(texts)
    tok.save_pretrained(out)
    vcfg = SiglipVisionConfig(hidden_size=VD, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                              image_size=TILE, patch_size=PATCH)
    (out / tower).mkdir()
    (out / tower / "config.json").write_text(json.dumps(
        {"model_type": "siglip", "vision_config": {k: v for k, v in vcfg.to_dict().items()
                                                   if k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                            "num_attention_heads", "image_size", "patch_size")}}))
    SiglipImageProcessorPil(size={"height": TILE, "width": TILE}).save_pretrained(out / tower)
    gcfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=D, n_layer=2, n_head=2, n_inner=64,
                      activation_function="gelu", bos_token_id=EOD, eos_token_id=EOD)
    torch.manual_seed(0)
    lm, vt = GPT2LMHeadModel(gcfg), SiglipVisionModel(vcfg)
    proj = torch.nn.Sequential(torch.nn.Linear(2 * VD, D), torch.nn.GELU(), torch.nn.Linear(D, D))
    for i, m in enumerate((lm, vt, proj)):
        _scramble(m, i)
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    state.update({"model.vision_tower.vision_tower." + k: v for k, v in vt.state_dict().items()})
    state.update({"model.mm_projector." + k: v for k, v in proj.state_dict().items()})
    state = {k: v.contiguous().clone() for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"))
    config = {k: v for k, v in gcfg.to_dict().items() if k.startswith("n_") or k in (
        "vocab_size", "activation_function", "layer_norm_epsilon", "bos_token_id", "eos_token_id")}
    config.update(model_type="llava-jp", architectures=["LlavaGpt2ForCausalLM"], mm_vision_tower=tower,
                  mm_hidden_size=2 * VD, mm_projector_type="mlp2x_gelu", mm_vision_select_feature="patch",
                  mm_vision_select_layer=-2, scales=[1.0, 0.5], image_aspect_ratio="square",
                  tokenizer_padding_side="right", use_mm_proj=True)
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": EOD, "eos_token_id": EOD}))
    return state, gcfg, vcfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    toydata.generate_jp_shapes(root / "data", n_train=8, n_val=6, n_yj=2)
    texts = toydata.all_caption_texts(root / "data") + [ENTRY.prompt.replace("<image>", "")] * 20
    state, gcfg, vcfg = build_llava_jp(root / "model", texts)
    val = json.loads((root / "data" / "stair_captions_v1.2_val.json").read_text(encoding="utf-8"))
    records = [{"image_id": im["id"], "file_name": f"val2014/{im['file_name']}"} for im in val["images"][:3]]
    model, processor = load_llava_jp(root / "model")
    return dict(root=root, dir=root / "model", data=root / "data", records=records, state=state, gcfg=gcfg,
                vcfg=vcfg, model=model, processor=processor, texts=texts)


def _image(tiny, i=0):
    return engine.load_image_for_model(tiny["data"] / tiny["records"][i]["file_name"])


# ------------------------------------------------------------------------------------------------
# the independent reference
# ------------------------------------------------------------------------------------------------

def ref_image_tokens(tiny, pixels):
    """S2: scale 1.0 as 2×2 tiles of 42 px, scale 0.5 as one pass; SigLIP hidden layer −2 minus token 0,
    read as a ⌊√8⌋ × 4 grid; tiles side by side; area-resized to 2 × 4; concatenated on channels."""
    from transformers import SiglipVisionModel

    vt = SiglipVisionModel(tiny["vcfg"]).eval()
    prefix = "model.vision_tower.vision_tower."
    vt.load_state_dict({k[len(prefix):]: v for k, v in tiny["state"].items() if k.startswith(prefix)})

    def feats(x):  # (3, 42, 42) → (2, 4, VD) grid
        hs = vt(pixel_values=x[None], output_hidden_states=True).hidden_states[-2][0, 1:]
        return hs.reshape(2, 4, VD)

    big = pixels  # 84 px: the 1.0 scale is the input itself
    rows = [torch.cat([feats(big[:, r * 42:(r + 1) * 42, c * 42:(c + 1) * 42]) for c in range(2)], dim=1)
            for r in range(2)]
    full = torch.cat(rows, dim=0)                                     # (4, 8, VD)
    full = full.reshape(2, 2, 4, 2, VD).mean(dim=(1, 3))              # area resize 4×8 → 2×4
    half = feats(F.interpolate(pixels[None].float(), size=42, mode="bicubic")[0])
    grid = torch.cat([full, half], dim=-1).reshape(8, 2 * VD)
    s = tiny["state"]
    h = F.gelu(grid @ s["model.mm_projector.0.weight"].T + s["model.mm_projector.0.bias"])
    return h @ s["model.mm_projector.2.weight"].T + s["model.mm_projector.2.bias"]


def ref_gpt2_logits(tiny, embeds):
    s, cfg = tiny["state"], tiny["gcfg"]
    n, heads = embeds.shape[0], cfg.n_head
    h = embeds + s["transformer.wpe.weight"][:n]
    causal = torch.ones(n, n).tril().bool()
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        x = F.layer_norm(h, (D,), s[p + "ln_1.weight"], s[p + "ln_1.bias"], cfg.layer_norm_epsilon)
        q, k, v = (x @ s[p + "attn.c_attn.weight"] + s[p + "attn.c_attn.bias"]).split(D, dim=-1)
        q, k, v = (t.reshape(n, heads, D // heads).transpose(0, 1) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D // heads)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        a = (att @ v).transpose(0, 1).reshape(n, D)
        h = h + a @ s[p + "attn.c_proj.weight"] + s[p + "attn.c_proj.bias"]
        x = F.layer_norm(h, (D,), s[p + "ln_2.weight"], s[p + "ln_2.bias"], cfg.layer_norm_epsilon)
        m = F.gelu(x @ s[p + "mlp.c_fc.weight"] + s[p + "mlp.c_fc.bias"])
        h = h + m @ s[p + "mlp.c_proj.weight"] + s[p + "mlp.c_proj.bias"]
    h = F.layer_norm(h, (D,), s["transformer.ln_f.weight"], s["transformer.ln_f.bias"], cfg.layer_norm_epsilon)
    return h @ s["transformer.wte.weight"].T  # tied head


def ref_logits(tiny, ids, pixels):
    wte = tiny["state"]["transformer.wte.weight"]
    cut = ids.index(IMAGE_TOKEN_INDEX)
    embeds = torch.cat([wte[ids[:cut]], ref_image_tokens(tiny, pixels), wte[ids[cut + 1:]]])
    return ref_gpt2_logits(tiny, embeds)


# ------------------------------------------------------------------------------------------------
# (a) tokenisation and logits
# ------------------------------------------------------------------------------------------------

def test_prompt_tokens_follow_tokenizer_image_token(tiny):
    proc, tok = tiny["processor"], tiny["processor"].tokenizer
    prompt = engine.build_prompt(ENTRY, proc)
    before, after = prompt.split("<image>")
    assert tok(before).input_ids[-1] == EOD                              # the tokenizer appends <EOD|LLM-jp>
    expected = tok(before).input_ids + [IMAGE_TOKEN_INDEX] + tok(after).input_ids[:-1]
    assert proc.tokenize(prompt) == expected                             # EOD kept before the image, final one dropped
    assert proc.image_size == 84 and proc.image_seq_length == 8


def test_logits_equal_the_reference_forward(tiny):
    proc, model = tiny["processor"], tiny["model"]
    prompt = engine.build_prompt(ENTRY, proc)
    inputs = proc(text=[prompt], images=[_image(tiny)], padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 84, 84)
    with torch.no_grad():
        got = model(**inputs)[0]
        want = ref_logits(tiny, inputs["input_ids"][0].tolist(), inputs["pixel_values"][0])
    assert got.shape == want.shape == (inputs["input_ids"].shape[1] - 1 + 8, len(proc.tokenizer))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_pytorch_bin_weights_load_the_same(tiny, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    shutil.copytree(tiny["dir"], folder)
    (folder / "model.safetensors").unlink()
    torch.save(load_file(str(tiny["dir"] / "model.safetensors")), folder / "pytorch_model.bin")
    model, proc = load_llava_jp(folder)
    inputs = proc(text=[engine.build_prompt(ENTRY, proc)], images=[_image(tiny)], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), tiny["model"](**inputs))


# ------------------------------------------------------------------------------------------------
# (b) KV cache, (c) batching
# ------------------------------------------------------------------------------------------------

def _no_cache_greedy(model, inputs, steps):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    new = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"])
        tok = logits[:, -1].argmax(-1)
        new.append(int(tok))
        if int(tok) == EOD:
            break
        ids = torch.cat([ids, tok[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return new


def test_cached_greedy_equals_a_no_cache_loop(tiny):
    proc, model = tiny["processor"], tiny["model"]
    for i in range(2):
        inputs = proc(text=[engine.build_prompt(ENTRY, proc)], images=[_image(tiny, i)], return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        cached = model.generate(**inputs, max_new_tokens=12)[0, n:].tolist()
        assert cached == _no_cache_greedy(model, inputs, 12)
        assert cached == model.generate(**inputs, max_new_tokens=12, use_cache=False)[0, n:].tolist()
        assert len(cached) == 12 or cached[-1] == EOD


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    proc, model = tiny["processor"], tiny["model"]
    prompts = [engine.build_prompt(ENTRY, proc), engine.build_prompt(ENTRY, proc, instruction="色は？")]
    images = [_image(tiny, 0), _image(tiny, 1)]
    batch = proc(text=prompts, images=images, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0                            # the shorter prompt is left-padded
    out = model.generate(**batch, max_new_tokens=10)[:, batch["input_ids"].shape[1]:]
    for i in range(2):
        one = proc(text=[prompts[i]], images=[images[i]], return_tensors="pt")
        alone = model.generate(**one, max_new_tokens=10)[0, one["input_ids"].shape[1]:].tolist()
        got = out[i].tolist()[:len(alone)]
        assert got == alone, i
        with torch.no_grad():  # and the logits of the real positions agree
            b, s = model(**batch)[i], model(**one)[0]
        torch.testing.assert_close(b[-s.shape[0]:], s, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# (d) the engine
# ------------------------------------------------------------------------------------------------

def test_engine_captions_through_load_model(tiny, tmp_path):
    from jpcap_helpers.params import Params

    params = Params.from_dict({"run": {"output_dir": str(tmp_path)}, "model": {"name": str(tiny["dir"])}},
                              check_paths=False)
    model, processor, entry = load_model(params)
    assert entry.family == "llava_jp" and entry.prompt == ENTRY.prompt
    assert resolve(str(tiny["dir"])).family == "llava_jp"
    batched = engine.caption_records(model, processor, entry, tiny["records"], tiny["data"], tmp_path / "b.jsonl",
                                     batch_size=3, max_new_tokens=6, progress=False)
    engine.caption_records(model, processor, entry, tiny["records"], tiny["data"], tmp_path / "s.jsonl",
                           batch_size=1, max_new_tokens=6, progress=False)
    assert batched["n_captioned"] == 3 and batched["n_errors"] == 0 and batched["decoder"] == "hf generate"
    rows = {r["image_id"]: r["caption"] for r in jio.read_jsonl(tmp_path / "b.jsonl")}
    assert rows == {r["image_id"]: r["caption"] for r in jio.read_jsonl(tmp_path / "s.jsonl")}
    assert any(rows.values()), "the scrambled model should emit some text"


def test_registry_entry_is_native_and_refuses_4bit(tiny, tmp_path):
    from jpcap_helpers.params import Params

    assert ENTRY.loader == "native" and resolve("llava-jp-1.3b") is ENTRY  # no trust_remote_code needed
    assert ENTRY.licence == "CC-BY-NC-4.0" and "STAIR" in ENTRY.contamination_note
    params = Params.from_dict({"run": {"output_dir": str(tmp_path)},
                               "model": {"name": str(tiny["dir"]), "load_in_4bit": True}}, check_paths=False)
    with pytest.raises(ModelError, match="4-bit.*load_in_4bit: false"):
        load_model(params)


# ------------------------------------------------------------------------------------------------
# (e) bad input: one clear error naming the model and the fix
# ------------------------------------------------------------------------------------------------

def _copy(tiny, tmp_path, name="bad"):
    folder = tmp_path / name
    shutil.copytree(tiny["dir"], folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_wrong_family_folder(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    _edit_config(folder, model_type="qwen2_vl")
    with pytest.raises(LlavaJpError, match=r"LLaVA-JP .*model_type 'qwen2_vl'.*model\.name"):
        load_llava_jp(folder)


def test_missing_weights_and_tokenizer(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(LlavaJpError, match=r"LLaVA-JP .*no weights.*Download"):
        load_llava_jp(folder)
    folder = _copy(tiny, tmp_path, "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(LlavaJpError, match=r"LLaVA-JP .*no tokenizer.*Copy"):
        load_llava_jp(folder)


def test_vision_tower_not_found_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    folder = _copy(tiny, tmp_path)
    _edit_config(folder, mm_vision_tower="google/siglip-so400m-patch14-384")
    with pytest.raises(LlavaJpError, match=r"vision tower 'google/siglip-so400m-patch14-384'.*mm_vision_tower"):
        load_llava_jp(folder)
    _edit_config(folder, mm_vision_tower=str(folder / "siglip"))  # an absolute local folder works
    load_llava_jp(folder)


def test_pickled_objects_are_never_loaded(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    (folder / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"transformer.wte.weight": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(LlavaJpError, match="not a plain tensor checkpoint"):
        load_llava_jp(folder)


def test_incomplete_or_foreign_weights(tiny, tmp_path):
    from safetensors.torch import save_file

    folder = _copy(tiny, tmp_path)
    state = dict(tiny["state"])
    state.pop("model.mm_projector.2.bias")
    state["something.else"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(LlavaJpError, match=r"not a LLaVA-JP v1.1 checkpoint: missing 1.*unknown 1"):
        load_llava_jp(folder)

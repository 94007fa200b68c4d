"""Asagi on transformers' own Llava classes (models/asagi.py), on a tiny folder in the transformers-4.45
layout Asagi's checkpoint uses: 4.45 weight keys (language_model.model.*, language_model.lm_head,
vision_tower.vision_model.*, multi_modal_projector.*), a config.json with an auto_map to remote code,
an unexpanded ``<image>`` in the prompt. The reference forward is what the 4.45 model computed, written
here by hand: SigLIP hidden layer, feature selection, the 2-layer projector, the image's features spliced
in place of the one ``<image>`` token, then the Llama language model."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.nn import functional as F

from jpcap_helpers import engine
from jpcap_helpers import io as jio
from jpcap_helpers.data import toy as toydata
from jpcap_helpers.models import REGISTRY, ModelError, load_model, resolve
from jpcap_helpers.models.asagi import image_token_count, llava_config
from jpcap_helpers.models.asagi import load_model as load_asagi

ENTRY = REGISTRY["asagi-2b"]
SIDE, PATCH = 28, 14  # 2 × 2 = 4 patches


def _tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=300, min_frequency=2, show_progress=False, max_token_length=6,
        special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>", clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def build_asagi(out, texts, strategy="default", layer=-2):
    """A tiny Asagi folder in the 4.45 layout; returns (reference modules, image token id)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    out.mkdir(parents=True)
    tok = _tokenizer(texts)
    tok.save_pretrained(out)
    image_id = tok.convert_tokens_to_ids("<image>")
    SiglipImageProcessor(size={"height": SIDE, "width": SIDE}).save_pretrained(out)
    vcfg = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                              image_size=SIDE, patch_size=PATCH)
    tcfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    vt, lm = SiglipVisionModel(vcfg).eval(), LlamaForCausalLM(tcfg).eval()
    proj = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    with torch.no_grad():
        for i, module in enumerate((vt, lm, proj)):
            gen = torch.Generator().manual_seed(i)
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() >= 2 else 0.1))
    state = {"vision_tower." + k: v for k, v in vt.state_dict().items()}  # SiglipVisionModel: vision_model.*
    state.update({"language_model." + k: v for k, v in lm.state_dict().items()})  # model.* and lm_head
    state.update({"multi_modal_projector.linear_1." + k: v for k, v in proj[0].state_dict().items()})
    state.update({"multi_modal_projector.linear_2." + k: v for k, v in proj[2].state_dict().items()})
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(out / "model.safetensors"))
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "auto_map": {"AutoConfig": "configuration_llava.LlavaConfig",
                           "AutoModel": "modeling_llava.LlavaForConditionalGeneration"},
              "image_token_index": image_id, "projector_hidden_act": "gelu",
              "vision_feature_select_strategy": strategy, "vision_feature_layer": layer,
              "transformers_version": "4.45.1", "torch_dtype": "float32",
              "vision_config": {**{k: getattr(vcfg, k) for k in ("hidden_size", "intermediate_size",
                                                                   "num_hidden_layers", "num_attention_heads",
                                                                   "image_size", "patch_size")},
                                "model_type": "siglip_vision_model"},
              "text_config": {**tcfg.to_dict(), "model_type": "llama"}}
    (out / "config.json").write_text(json.dumps(config))
    return dict(vt=vt, lm=lm, proj=proj, image_id=image_id, strategy=strategy, layer=layer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("asagi")
    toydata.generate_jp_shapes(root / "data", n_train=8, n_val=6, n_yj=2)
    texts = toydata.all_caption_texts(root / "data") + [ENTRY.prompt.replace("<image>", "")] * 20
    ref = build_asagi(root / "model", texts)
    val = json.loads((root / "data" / "stair_captions_v1.2_val.json").read_text(encoding="utf-8"))
    records = [{"image_id": im["id"], "file_name": f"val2014/{im['file_name']}"} for im in val["images"][:3]]
    model, processor = load_asagi(ENTRY, str(root / "model"), torch.float32)
    return dict(root=root, dir=root / "model", data=root / "data", records=records, ref=ref, model=model,
                processor=processor, texts=texts)


def _image(tiny, i=0):
    return engine.load_image_for_model(tiny["data"] / tiny["records"][i]["file_name"])


def ref_logits(ref, tokenizer, prompt, pixel_values):
    """The 4.45 Llava forward by hand: the prompt tokenised with ONE <image> token, which is replaced by
    the image's projected features (all of them)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    assert int((ids == ref["image_id"]).sum()) == 1
    with torch.no_grad():
        hidden = ref["vt"](pixel_values=pixel_values, output_hidden_states=True).hidden_states[ref["layer"]][0]
        if ref["strategy"] == "default":
            hidden = hidden[1:]
        feats = ref["proj"](hidden)
        words = ref["lm"].get_input_embeddings()(ids)
        at = int((ids == ref["image_id"]).nonzero())
        embeds = torch.cat([words[:at], feats, words[at + 1:]])[None]
        return ref["lm"](inputs_embeds=embeds).logits[0], feats.shape[0]


def test_config_mapping_and_token_count(tiny):
    cfg = llava_config(tiny["dir"])
    assert cfg.model_type == "llava" and cfg.vision_feature_select_strategy == "default"
    assert cfg.vision_feature_layer == -2 and cfg.image_token_index == tiny["ref"]["image_id"]
    assert image_token_count(cfg) == 3  # 2×2 SigLIP patches, "default" drops the first
    inputs = tiny["processor"](text=[ENTRY.prompt], images=[_image(tiny)], return_tensors="pt")
    assert int((inputs["input_ids"] == tiny["ref"]["image_id"]).sum()) == 3


@pytest.mark.parametrize("strategy,layer", [("default", -2), ("full", -1)])
def test_logits_equal_the_445_forward(tiny, tmp_path, strategy, layer):
    if (strategy, layer) == ("default", -2):
        model, processor, ref = tiny["model"], tiny["processor"], tiny["ref"]
    else:
        ref = build_asagi(tmp_path / "m", tiny["texts"], strategy=strategy, layer=layer)
        model, processor = load_asagi(ENTRY, str(tmp_path / "m"), torch.float32)
    inputs = processor(text=[ENTRY.prompt], images=[_image(tiny)], return_tensors="pt")
    with torch.no_grad():
        got = model(**inputs).logits[0]
    want, n_image = ref_logits(ref, processor.tokenizer, ENTRY.prompt, inputs["pixel_values"])
    assert n_image == (3 if strategy == "default" else 4) and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_engine_captions_batched_like_one_by_one(tiny, tmp_path):
    from jpcap_helpers.params import Params

    params = Params.from_dict({"run": {"output_dir": str(tmp_path)}, "model": {"name": "asagi-2b"}},
                              check_paths=False)
    model, processor, entry = load_model(params, str(tiny["dir"]))
    assert entry.family == "asagi" and resolve(str(tiny["dir"])).family == "asagi"
    out_b, out_s = tmp_path / "b.jsonl", tmp_path / "s.jsonl"
    batched = engine.caption_records(model, processor, entry, tiny["records"], tiny["data"], out_b,
                                     batch_size=3, max_new_tokens=6, progress=False)
    engine.caption_records(model, processor, entry, tiny["records"], tiny["data"], out_s,
                           batch_size=1, max_new_tokens=6, progress=False)
    assert batched["n_captioned"] == 3 and batched["n_errors"] == 0
    rows = {r["image_id"]: r["caption"] for r in jio.read_jsonl(out_b)}
    assert rows == {r["image_id"]: r["caption"] for r in jio.read_jsonl(out_s)}
    assert any(rows.values()), "the scrambled model should emit some text"


def test_registry_entry_needs_no_remote_code():
    assert ENTRY.loader == "native" and resolve("asagi-2b") is ENTRY
    assert ENTRY.trained_on_stair is True  # STAIR and YJ in its training data


def _copy(tiny, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny["dir"], folder)
    return folder


def test_bad_folders_name_the_model_and_the_fix(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    with pytest.raises(ModelError, match="asagi-2b .*'qwen2_vl' model.*another family"):
        load_asagi(ENTRY, str(folder), torch.float32)
    (folder / "config.json").write_text(json.dumps({**config, "image_token_index": 5}))
    with pytest.raises(ModelError, match="image_token_index 5"):
        load_asagi(ENTRY, str(folder), torch.float32)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weights"):
        load_asagi(ENTRY, str(folder), torch.float32)
    shutil.copy(tiny["dir"] / "model.safetensors", folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match="preprocessor_config.json"):
        load_asagi(ENTRY, str(folder), torch.float32)


def test_incomplete_weights_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["multi_modal_projector.linear_2.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelError, match="missing 1 weights.*multi_modal_projector"):
        load_asagi(ENTRY, str(folder), torch.float32)


def test_no_feature_leaks_between_images(tiny):
    """Two images in one left-padded batch caption as they do alone (padding and splice positions)."""
    images = [_image(tiny, 0), _image(tiny, 1)]
    proc, model = tiny["processor"], tiny["model"]
    prompts = [ENTRY.prompt, ENTRY.prompt.replace("説明", "短く説明")]
    batch = proc(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        together = model(**batch).logits[:, -1]
        for i in range(2):
            alone = model(**proc(text=[prompts[i]], images=[images[i]], return_tensors="pt")).logits[0, -1]
            torch.testing.assert_close(F.log_softmax(together[i], -1), F.log_softmax(alone, -1), rtol=1e-4, atol=1e-4)

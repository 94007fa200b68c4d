"""Caption engine on the offline tiny Qwen2-VL (random weights: the captions are junk; only the
mechanics are tested — batching, padding, resume, error rows, normalisation, zero-shot files)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from jpcap_helpers import engine
from jpcap_helpers import io as jio
from jpcap_helpers.data import toy as toydata
from jpcap_helpers.engine import EngineOptions, decode, generation, images, pipeline
from jpcap_helpers.models import REGISTRY, build_tiny_model
from jpcap_helpers.params import TinyModelParams, load_params
from jpcap_helpers.text import normalize_caption

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
ENTRY = REGISTRY["tiny-qwen2-vl"]


def scramble_weights(model, seed: int = 0, std: float = 0.3) -> None:
    """Replace matrix weights with larger random values so greedy outputs differ per image (a freshly
    initialised tiny model emits the same token for every input, which would make comparisons vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with jp-shapes, a processed split and the tiny model (built once)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root = tmp_path_factory.mktemp("proj")
    data = root / "data"
    toydata.generate_jp_shapes(data, n_train=16, n_val=12, n_yj=4)
    model_dir = build_tiny_model(root / "models" / "tiny-qwen2-vl", toydata.all_caption_texts(data),
                                 TinyModelParams(), MIN_PIXELS, MAX_PIXELS)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    scramble_weights(model)
    val = json.loads((data / "stair_captions_v1.2_val.json").read_text(encoding="utf-8"))
    caps: dict[int, list[str]] = {}
    for a in val["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    records = [{"image_id": im["id"], "file_name": f"val2014/{im['file_name']}", "captions": caps[im["id"]]}
               for im in val["images"]]
    return {"root": root, "data": data, "model": model, "processor": processor, "records": records}


def _rows(path: Path) -> list[dict]:
    return list(jio.read_jsonl(path))


def test_batched_greedy_equals_per_image(project, tmp_path):
    model, processor, records = project["model"], project["processor"], project["records"][:8]
    keys = set()
    for r in records:
        with Image.open(project["data"] / r["file_name"]) as im:
            keys.add(images.group_key(processor, im.height, im.width))
    assert len(keys) >= 2, "the images must need different visual-token counts so padding is exercised"

    batched = engine.caption_records(model, processor, ENTRY, records, project["data"], tmp_path / "b.jsonl",
                                     batch_size=8, max_new_tokens=8, progress=False)
    single = engine.caption_records(model, processor, ENTRY, records, project["data"], tmp_path / "s.jsonl",
                                    batch_size=1, max_new_tokens=8, progress=False)
    assert batched["n_done"] == single["n_done"] == 8 and batched["n_errors"] == 0
    b = {r["image_id"]: r["caption"] for r in _rows(tmp_path / "b.jsonl")}
    s = {r["image_id"]: r["caption"] for r in _rows(tmp_path / "s.jsonl")}
    assert b == s
    assert len(set(b.values())) > 1, "outputs should depend on the image"


def test_batches_group_by_visual_tokens_and_pad_left(project, tmp_path, monkeypatch):
    seen = []
    real = generation.prepare_inputs

    def spy(processor, prompts, images, **kw):
        inputs = real(processor, prompts, images, **kw)
        seen.append(inputs)
        return inputs

    monkeypatch.setattr(pipeline, "prepare_inputs", spy)
    hf = engine.caption_records(project["model"], project["processor"], ENTRY, project["records"], project["data"],
                                tmp_path / "p.jsonl", batch_size=5, max_new_tokens=2, progress=False, decoder="hf")
    assert hf["decoder"] == "hf generate"
    lengths = [int(b["attention_mask"].sum(dim=1).max()) for b in seen]
    assert lengths == sorted(lengths), "batches come sorted by prompt length"
    assert any(not bool(b["attention_mask"].all()) for b in seen), "some HF batch mixes grids (padding exercised)"
    for b in seen:  # left padding: every row ends with real tokens
        assert bool(b["attention_mask"][:, -1].all())

    seen.clear()
    fast = engine.caption_records(project["model"], project["processor"], ENTRY, project["records"],
                                  project["data"], tmp_path / "f.jsonl", batch_size=3, max_new_tokens=2,
                                  progress=False)
    assert fast["decoder"] == "static-cache greedy" and fast["n_errors"] == 0
    for b in seen:  # the fast decoder gets batches of one visual grid: no padding at all
        assert bool(b["attention_mask"].all()) and bool((b["image_grid_thw"] == b["image_grid_thw"][0]).all())
    assert sum(len(b["input_ids"]) for b in seen) == len(project["records"])


def test_fast_decoder_equals_hf_generate(project, tmp_path):
    """The static-cache greedy decoder gives HF greedy decoding's captions, end tokens included."""
    model, processor, records = project["model"], project["processor"], project["records"]
    kw = dict(batch_size=4, max_new_tokens=10, progress=False)
    fast = engine.caption_records(model, processor, ENTRY, records, project["data"], tmp_path / "f.jsonl", **kw)
    hf = engine.caption_records(model, processor, ENTRY, records, project["data"], tmp_path / "h.jsonl",
                                decoder="hf", **kw)
    assert (fast["decoder"], hf["decoder"]) == ("static-cache greedy", "hf generate")
    f = {r["image_id"]: r["caption"] for r in _rows(tmp_path / "f.jsonl")}
    h = {r["image_id"]: r["caption"] for r in _rows(tmp_path / "h.jsonl")}
    assert f == h and len(set(f.values())) > 1


def _images_of_one_size(project, n: int) -> list:
    """Up to ``n`` of the toy images sharing the most common size (one visual grid)."""
    by_size: dict = {}
    for r in project["records"]:
        im = engine.load_image_for_model(project["data"] / r["file_name"])
        by_size.setdefault(im.size, []).append(im)
    return max(by_size.values(), key=len)[:n]


def test_greedy_decoder_tokens_and_end_tokens(project):
    model, processor = project["model"], project["processor"]
    images = _images_of_one_size(project, 4)
    assert len(images) >= 3
    prompt = engine.build_prompt(ENTRY, processor)
    inputs = generation.prepare_inputs(processor, [prompt] * len(images), images)
    pad = model.generation_config.pad_token_id
    free = generation.generation_config(model, 12, 1, [], pad)  # no end token: all 12 steps
    with torch.no_grad():
        ref = model.generate(**inputs, generation_config=free)[:, inputs["input_ids"].shape[1]:]
    dec = decode.GreedyDecoder(model, eos_ids=[], pad_id=pad, max_batch=8)
    assert dec.prefill == "own" and torch.equal(dec.generate(inputs, 12), ref)
    via_model = decode.GreedyDecoder(model, eos_ids=[], pad_id=pad, max_batch=8, prefill="model")
    assert torch.equal(via_model.generate(inputs, 12), ref), "prefill through the model's forward: same tokens"
    # declare a token the model emits mid-caption an end token: rows stop there, padded after it
    stop = int(ref[0, 3])
    cfg = generation.generation_config(model, 12, 1, [stop], pad)
    with torch.no_grad():
        ref_stop = model.generate(**inputs, generation_config=cfg)[:, inputs["input_ids"].shape[1]:]
    got = decode.GreedyDecoder(model, eos_ids=[stop], pad_id=pad, max_batch=8).generate(inputs, 12)
    assert torch.equal(got[:, :ref_stop.shape[1]], ref_stop) and bool((got[:, ref_stop.shape[1]:] == pad).all())
    assert int(got[0, 4]) == pad
    # batches the decoder must not take
    with pytest.raises(ValueError, match="max_batch"):
        decode.GreedyDecoder(model, eos_ids=[], pad_id=pad, max_batch=2).generate(inputs, 4)
    mixed = generation.prepare_inputs(processor, [prompt] * 2, [images[0], images[0].resize((60, 40))])
    with pytest.raises(ValueError, match="one visual grid"):
        dec.generate(mixed, 4)


def test_precomputed_vision_inputs_equal_the_towers_own(project):
    """The decoder hands the vision tower its rotary positions and segment bounds, computed once per
    batch shape: the tower's output is the one it computes itself."""
    model, processor = project["model"], project["processor"]
    images = _images_of_one_size(project, 3)
    inputs = generation.prepare_inputs(processor, [engine.build_prompt(ENTRY, processor)] * len(images), images)
    dec = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=4)
    vision = dec._vision_inputs(inputs["image_grid_thw"])
    assert vision is not None and dec._vision_inputs(inputs["image_grid_thw"]) is vision  # cached
    with torch.no_grad():
        own = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        given = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], **vision).pooler_output
    assert len(own) == len(given) == len(images)
    assert all(torch.equal(a, b) for a, b in zip(own, given))


def test_image_tensors_preprocess_like_pil_images(project):
    """The GPU path hands the processor uint8 tensors decoded in the loader threads: same pixels."""
    processor = project["processor"]
    paths = [project["data"] / r["file_name"] for r in project["records"][:3]]
    prompt = engine.build_prompt(ENTRY, processor)
    from_pil = generation.prepare_inputs(processor, [prompt] * 3, [engine.load_image_for_model(p) for p in paths])
    from_tensor = generation.prepare_inputs(processor, [prompt] * 3, [images.load_image_tensor(p, pin=False)
                                                                    for p in paths])
    for key in ("input_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(from_pil[key], from_tensor[key]), key


@pytest.mark.slow
def test_compiled_own_prefill_is_one_graph_and_exact(project):
    """The engine's prefill on GPUs with ``model.compile``: one torch.compile'd layer function serves every
    layer (one graph, no breaks) and gives the model's tokens (CPU, fp32; ≈30 s of compilation)."""
    from torch._dynamo.utils import counters

    model, processor = project["model"], project["processor"]
    im = engine.load_image_for_model(project["data"] / project["records"][0]["file_name"])
    inputs = generation.prepare_inputs(processor, [engine.build_prompt(ENTRY, processor)] * 2, [im, im])
    cfg = generation.generation_config(model, 6, 1, [], model.generation_config.pad_token_id)
    with torch.no_grad():
        ref = model.generate(**inputs, generation_config=cfg)[:, inputs["input_ids"].shape[1]:]
    torch._dynamo.reset()
    counters.clear()
    dec = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=2, prefill="own", compile_prefill=True)
    assert torch.equal(dec.generate(inputs, 6), ref)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    # the decoding step's two layer functions, compiled likewise: one graph each, the same tokens
    step = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=2, compile_step=True)
    assert torch.equal(step.generate(inputs, 6), ref)
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]
    torch._dynamo.reset()


def test_greedy_decoder_with_an_unmerged_adapter(project):
    """LoRA layers left unmerged (as on a 4-bit base) run inside the decoder's step too."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(project["model"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.eval()
    processor = project["processor"]
    im = engine.load_image_for_model(project["data"] / project["records"][0]["file_name"])
    inputs = generation.prepare_inputs(processor, [engine.build_prompt(ENTRY, processor)] * 2, [im, im])
    cfg = generation.generation_config(peft_model, 8, 1, [], model.generation_config.pad_token_id)
    with torch.no_grad():
        ref = peft_model.generate(**inputs, generation_config=cfg)[:, inputs["input_ids"].shape[1]:]
        base = project["model"].generate(**inputs, generation_config=cfg)[:, inputs["input_ids"].shape[1]:]
    assert not torch.equal(ref, base), "the adapter must change the output for this test to mean anything"
    assert decode.supports(peft_model, "qwen2_vl")
    got = decode.GreedyDecoder(peft_model, eos_ids=[], pad_id=0, max_batch=2).generate(inputs, 8)
    assert torch.equal(got, ref)


def test_resume_after_kill_and_partial_line(project, tmp_path, monkeypatch):
    out = tmp_path / "resume.jsonl"
    records = project["records"]
    calls = {"n": 0}
    real = pipeline.generate_batch

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        engine.caption_records(project["model"], project["processor"], ENTRY, records, project["data"], out,
                               batch_size=4, max_new_tokens=3, progress=False)
    first = _rows(out)
    assert len(first) == 4
    with open(out, "a", encoding="utf-8") as fh:  # a write cut by the kill
        fh.write('{"image_id": 999, "capt')
    monkeypatch.setattr(pipeline, "generate_batch", real)
    summary = engine.caption_records(project["model"], project["processor"], ENTRY, records, project["data"],
                                     out, batch_size=4, max_new_tokens=3, progress=True)
    rows = _rows(out)  # strict read: the partial line is gone
    ids = [r["image_id"] for r in rows]
    assert sorted(ids) == sorted(r["image_id"] for r in records)
    assert len(ids) == len(set(ids))
    assert summary["n_skipped_existing"] == 4 and summary["n_done"] == len(records) - 4
    assert rows[:4] == first, "rows written before the kill are kept as they were"

    again = engine.caption_records(project["model"], project["processor"], ENTRY, records, project["data"],
                                   out, batch_size=4, progress=False)
    assert again["n_done"] == 0 and again["n_skipped_existing"] == len(records)


def test_bad_images_become_error_rows(project, tmp_path, monkeypatch):
    images = tmp_path / "images"
    (images / "val2014").mkdir(parents=True)
    good = project["records"][:3]
    for r in good:
        (images / r["file_name"]).write_bytes((project["data"] / r["file_name"]).read_bytes())
    (images / "val2014" / "garbage.jpg").write_bytes(b"this is not an image")
    full = (project["data"] / good[0]["file_name"]).read_bytes()
    (images / "val2014" / "truncated.jpg").write_bytes(full[: len(full) // 3])
    Image.new("RGB", (61, 59), (1, 2, 3)).save(images / "val2014" / "poison.png")
    records = good + [
        {"image_id": 1, "file_name": "val2014/missing.jpg"},
        {"image_id": 2, "file_name": "val2014/garbage.jpg"},
        {"image_id": 3, "file_name": "val2014/truncated.jpg"},
        {"image_id": 4, "file_name": "val2014/poison.png"},
    ]
    real = generation.prepare_inputs

    def processor_rejects_poison(processor, prompts, images_, **kw):
        if any(im.size == (61, 59) for im in images_):
            raise RuntimeError("processor error on the poison image")
        return real(processor, prompts, images_, **kw)

    monkeypatch.setattr(pipeline, "prepare_inputs", processor_rejects_poison)
    summary = engine.caption_records(project["model"], project["processor"], ENTRY, records, images,
                                     tmp_path / "err.jsonl", batch_size=8, max_new_tokens=3, progress=False)
    rows = {r["image_id"]: r for r in _rows(tmp_path / "err.jsonl")}
    assert set(rows) == {r["image_id"] for r in records}
    assert summary["n_errors"] == 4 and summary["n_captioned"] == 3
    for bad, word in ((1, "FileNotFound"), (2, "Unidentified"), (3, "truncated"), (4, "poison")):
        assert rows[bad]["caption"] == "" and word in rows[bad]["error"], rows[bad]
    for r in good:
        assert "error" not in rows[r["image_id"]], "the good images in the poisoned batch still get captions"

    # once the culprit is fixed, retry_errors reruns only the error rows
    Image.new("RGB", (62, 59), (1, 2, 3)).save(images / "val2014" / "poison.png")
    again = engine.caption_records(project["model"], project["processor"], ENTRY, records, images,
                                   tmp_path / "err.jsonl", batch_size=8, max_new_tokens=3, progress=False,
                                   retry_errors=True)
    rows = _rows(tmp_path / "err.jsonl")
    assert again["n_skipped_existing"] == 3 and again["n_captioned"] == 1 and again["n_errors"] == 3
    assert sorted(r["image_id"] for r in rows) == sorted(r["image_id"] for r in records)


def test_outputs_are_cleaned_and_normalised(project, tmp_path, monkeypatch):
    raw = ["assistant\nＡＢＣ　の 犬です。<|im_end|>\n<|im_start|>user\nもう一枚", "ｶﾒﾗ が二台。\n"]
    monkeypatch.setattr(pipeline, "generate_batch", lambda p, inputs, *rest: raw[: len(inputs["input_ids"])])
    records = project["records"][:2]
    engine.caption_records(project["model"], project["processor"], ENTRY, records, project["data"],
                           tmp_path / "n.jsonl", batch_size=2, progress=False, extra={"split": "val"},
                           decoder="hf")  # one batch of both images, whatever their grids
    rows = _rows(tmp_path / "n.jsonl")
    assert sorted(r["caption"] for r in rows) == sorted(["ABC の犬です。", "カメラが二台。"])
    assert all(r["model"] == "tiny-qwen2-vl" and r["split"] == "val" for r in rows)


def test_real_outputs_hold_no_special_tokens(project, tmp_path):
    engine.caption_records(project["model"], project["processor"], ENTRY, project["records"][:4],
                           project["data"], tmp_path / "r.jsonl", batch_size=4, max_new_tokens=12, progress=False)
    for row in _rows(tmp_path / "r.jsonl"):
        assert row["caption"] == normalize_caption(row["caption"])
        assert "<|" not in row["caption"] and "assistant" not in row["caption"]


def test_bad_arguments(project, tmp_path):
    args = (project["model"], project["processor"], ENTRY)
    with pytest.raises(ValueError, match="record 0"):
        engine.caption_records(*args, [{"image_id": "7", "file_name": "x.jpg"}], project["data"],
                               tmp_path / "x.jsonl", progress=False)
    with pytest.raises(ValueError, match="extra"):
        engine.caption_records(*args, [], project["data"], tmp_path / "x.jsonl", extra={"caption": "x"})
    other = tmp_path / "other.jsonl"
    jio.append_jsonl(other, [{"image_id": 1, "caption": "x", "model": "another-model"}])
    with pytest.raises(ValueError, match="another-model"):
        engine.caption_records(*args, [], project["data"], other, progress=False)


def test_run_zero_shot_writes_predictions(project, capsys):
    root = project["root"]
    processed = project["data"] / "processed"
    processed.mkdir(exist_ok=True)
    jio.atomic_write_jsonl(processed / "test.jsonl", project["records"][:5])
    (root / "params").mkdir(exist_ok=True)
    (root / "params" / "zs.yaml").write_text(
        "run: {name: zs, output_dir: outputs}\n"
        "data: {root: data}\n"
        f"model: {{name: tiny-qwen2-vl, precision: fp32, min_pixels: {MIN_PIXELS}, max_pixels: {MAX_PIXELS},"
        " models_dir: models}\n"
        "generation: {batch_size: 4, max_new_tokens: 4}\n"
        "zero_shot: {models: [tiny-qwen2-vl], splits: [test, yj_test], max_images: 3}\n", encoding="utf-8")
    params = load_params(root / "params" / "zs.yaml")
    table = engine.run_zero_shot(params)
    assert "yj_test" in capsys.readouterr().out  # the missing split is reported, not fatal
    assert list(table["split"]) == ["test"] and int(table.loc[0, "n_done"]) == 3
    pred = Path(params.run_dir) / "predictions" / "tiny-qwen2-vl__test.jsonl"
    assert Path(table.loc[0, "pred_path"]) == pred
    rows = _rows(pred)
    assert {r["image_id"] for r in rows} == {r["image_id"] for r in project["records"][:3]}
    assert len(rows) == 3 and all(r["split"] == "test" for r in rows)
    assert table.loc[0, "contamination"] == "clean"

    meta = json.loads(pred.with_suffix(".meta.json").read_text(encoding="utf-8"))
    assert meta["model"] == "tiny-qwen2-vl" and meta["contamination"] == "clean" and meta["adapter"] == ""
    assert meta["last_run"]["n_done"] == 3 and meta["generation"]["max_new_tokens"] == 4

    again = engine.run_zero_shot(params, splits=["test"], max_images=5)  # resumes: only 2 new images
    assert int(again.loc[0, "n_skipped_existing"]) == 3 and int(again.loc[0, "n_done"]) == 2
    assert len(_rows(pred)) == 5

    items = engine.sample_items(params, model="tiny-qwen2-vl", split="test", n=3)
    assert len(items) == 3 and all(Path(path).is_file() and " / " in text for path, text in items)
    assert engine.sample_items(params, model="tiny-qwen2-vl", split="yj_test") == []

    sample = engine.sample_table(pred, processed / "test.jsonl", n=2)
    assert list(sample.columns) == ["image_id", "file_name", "prediction", "reference", "error"]
    assert len(sample) == 2
    first = next(r for r in project["records"] if r["image_id"] == sample.loc[0, "image_id"])
    assert sample.loc[0, "reference"] == first["captions"][0] and sample.loc[0, "file_name"] == first["file_name"]


def test_run_finetuned_reads_the_evaluate_keys_and_the_adapters_record(project):
    """Fine-tuned captioning: evaluate.splits / evaluate.max_images (not zero_shot's), and the base loads
    as the adapter's record says (full precision here), with a warning when model.load_in_4bit disagrees."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from jpcap_helpers.models import ADAPTER_INFO_FILE

    root = project["root"]
    processed = project["data"] / "processed"
    processed.mkdir(exist_ok=True)
    jio.atomic_write_jsonl(processed / "test.jsonl", project["records"][:5])
    (root / "params").mkdir(exist_ok=True)
    (root / "params" / "ft.yaml").write_text(
        "run: {name: ft, output_dir: outputs}\n"
        "data: {root: data}\n"
        f"model: {{name: tiny-qwen2-vl, precision: fp32, min_pixels: {MIN_PIXELS}, max_pixels: {MAX_PIXELS},"
        " models_dir: models, load_in_4bit: true}\n"
        "generation: {batch_size: 4, max_new_tokens: 4}\n"
        "zero_shot: {splits: [yj_test], max_images: 5}\n"
        "evaluate: {splits: [test], max_images: 2}\n", encoding="utf-8")
    params = load_params(root / "params" / "ft.yaml")
    adapter = root / "ft-adapter"
    base = AutoModelForImageTextToText.from_pretrained(root / "models" / "tiny-qwen2-vl")
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    jio.atomic_write_json(adapter / ADAPTER_INFO_FILE, {"base_model": "tiny-qwen2-vl", "base_load_in_4bit": False})

    with pytest.warns(UserWarning, match="load_in_4bit"):
        table = engine.run_finetuned(params, adapter)
    assert list(table["split"]) == ["test"] and int(table.loc[0, "n_done"]) == 2
    pred = Path(params.run_dir) / "predictions" / "tiny-qwen2-vl+ft__test.jsonl"
    assert Path(table.loc[0, "pred_path"]) == pred and len(_rows(pred)) == 2
    meta = json.loads(pred.with_suffix(".meta.json").read_text(encoding="utf-8"))
    assert meta["adapter"] == str(adapter)


def test_engine_options_unpipelined_prepares_after_each_batch(project, tmp_path, monkeypatch):
    """EngineOptions(pipeline=False): nothing is prepared or written while a batch decodes; same rows."""
    events: list[str] = []
    real_prepare, real_generate, real_append = generation.prepare_inputs, decode.GreedyDecoder.generate, jio.append_jsonl

    def prepare(processor, prompts, images, **kw):
        events.append("prepare")
        return real_prepare(processor, prompts, images, **kw)

    def generate(self, inputs, max_new_tokens, while_busy=None):
        assert while_busy is None
        events.append("generate")
        out = real_generate(self, inputs, max_new_tokens, while_busy=while_busy)
        events.append("done")
        return out

    def append(path, rows):
        events.append("write")
        return real_append(path, rows)

    monkeypatch.setattr(pipeline, "prepare_inputs", prepare)
    monkeypatch.setattr(decode.GreedyDecoder, "generate", generate)
    monkeypatch.setattr(jio, "append_jsonl", append)
    kw = dict(batch_size=3, max_new_tokens=4, progress=False)
    s = engine.caption_records(project["model"], project["processor"], ENTRY, project["records"], project["data"],
                               tmp_path / "u.jsonl", options=EngineOptions(pipeline=False), **kw)
    assert s["n_captioned"] == len(project["records"]) and events.count("generate") >= 3
    text = " ".join(events)
    assert "generate done" in text and "generate prepare" not in text and "generate write" not in text
    monkeypatch.undo()
    piped = engine.caption_records(project["model"], project["processor"], ENTRY, project["records"],
                                   project["data"], tmp_path / "p.jsonl", **kw)
    assert piped["n_captioned"] == s["n_captioned"]
    assert ({r["image_id"]: r["caption"] for r in _rows(tmp_path / "u.jsonl")}
            == {r["image_id"]: r["caption"] for r in _rows(tmp_path / "p.jsonl")})


def test_next_batch_is_prepared_while_the_current_one_decodes(project, tmp_path, monkeypatch):
    """The engine's pipeline: batch i+1 is tokenised/preprocessed, and batch i-1's rows are written,
    inside batch i's generate (while the GPU works on its prefill); rows are those of an unpipelined run."""
    events: list[str] = []
    real_prepare, real_generate, real_append = generation.prepare_inputs, decode.GreedyDecoder.generate, jio.append_jsonl

    def prepare(processor, prompts, images, **kw):
        events.append("prepare")
        return real_prepare(processor, prompts, images, **kw)

    def generate(self, inputs, max_new_tokens, while_busy=None):
        events.append("generate")
        out = real_generate(self, inputs, max_new_tokens, while_busy=while_busy)
        events.append("done")
        return out

    def append(path, rows):
        events.append("write")
        return real_append(path, rows)

    monkeypatch.setattr(pipeline, "prepare_inputs", prepare)
    monkeypatch.setattr(decode.GreedyDecoder, "generate", generate)
    monkeypatch.setattr(jio, "append_jsonl", append)
    kw = dict(batch_size=3, max_new_tokens=4, progress=False)
    s = engine.caption_records(project["model"], project["processor"], ENTRY, project["records"], project["data"],
                               tmp_path / "p.jsonl", **kw)
    n = events.count("generate")
    assert s["n_captioned"] == len(project["records"]) and n >= 3
    expected = ["prepare", "generate", "prepare", "done"]            # batch 0; batch 1 prepared inside it
    for _ in range(1, n - 1):                                        # writes batch i-1, prepares batch i+1
        expected += ["generate", "write", "prepare", "done"]
    expected += ["generate", "write", "done", "write"]               # the last batch has none after it
    assert events == expected
    monkeypatch.setattr(pipeline, "prepare_inputs", real_prepare)
    monkeypatch.setattr(decode.GreedyDecoder, "generate", real_generate)
    monkeypatch.setattr(jio, "append_jsonl", real_append)
    plain = engine.caption_records(project["model"], project["processor"], ENTRY, project["records"], project["data"],
                                   tmp_path / "h.jsonl", decoder="hf", **kw)
    assert plain["n_captioned"] == s["n_captioned"]
    assert ({r["image_id"]: r["caption"] for r in _rows(tmp_path / "p.jsonl")}
            == {r["image_id"]: r["caption"] for r in _rows(tmp_path / "h.jsonl")})


def test_a_write_failure_stops_the_run_instead_of_becoming_error_rows(project, tmp_path, monkeypatch):
    """Writing happens inside the next batch's generate; a disk error there is the engine's, not the
    images': it propagates, and no image is recorded as failed."""
    def disk_full(path, rows):
        raise OSError("No space left on device")

    monkeypatch.setattr(jio, "append_jsonl", disk_full)
    with pytest.raises(OSError, match="No space"):
        engine.caption_records(project["model"], project["processor"], ENTRY, project["records"], project["data"],
                               tmp_path / "d.jsonl", batch_size=3, max_new_tokens=2, progress=False)
    assert not (tmp_path / "d.jsonl").exists() or not _rows(tmp_path / "d.jsonl")


# ---------------------------------------------------------------------------------------------
# GPU (the lead runs these): the decoder with CUDA graphs against HF generate
# ---------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_fast_engine_equals_hf_on_tiny_model(project, tmp_path):
    import copy

    model = copy.deepcopy(project["model"]).to("cuda")
    kw = dict(batch_size=4, max_new_tokens=10, progress=False)
    # GPU image preprocessing rounds a little differently from the CPU's (compared below): for the
    # decoders' equality both read CPU-preprocessed pixels here
    fast = engine.caption_records(model, project["processor"], ENTRY, project["records"], project["data"],
                                  tmp_path / "f.jsonl", options=EngineOptions(preprocess_on_gpu=False), **kw)
    engine.caption_records(model, project["processor"], ENTRY, project["records"], project["data"],
                           tmp_path / "h.jsonl", decoder="hf", **kw)
    assert fast["decoder"] == "static-cache greedy"
    assert ({r["image_id"]: r["caption"] for r in _rows(tmp_path / "f.jsonl")}
            == {r["image_id"]: r["caption"] for r in _rows(tmp_path / "h.jsonl")})
    # batches of several sizes reuse one decoder: graphs per batch-size bucket, counters reset
    gpu = engine.caption_records(model, project["processor"], ENTRY, project["records"], project["data"],
                                 tmp_path / "g.jsonl", options=EngineOptions(preprocess_on_gpu=True), **kw)
    assert gpu["n_errors"] == 0 and gpu["n_captioned"] == len(project["records"])
    images = [engine.load_image_for_model(project["data"] / r["file_name"]) for r in project["records"][:3]]
    prompt = engine.build_prompt(ENTRY, project["processor"])
    on_cpu = generation.prepare_inputs(project["processor"], [prompt] * 3, images)
    on_gpu = generation.prepare_inputs(project["processor"], [prompt] * 3, images, device="cuda")
    assert on_gpu["pixel_values"].is_cuda and torch.equal(on_gpu["input_ids"].cpu(), on_cpu["input_ids"])
    torch.testing.assert_close(on_gpu["pixel_values"].cpu(), on_cpu["pixel_values"], atol=0.05, rtol=0)


def check_graph_decoder_tokens(model, inputs, ref, new_tokens: int = 12):
    """The CUDA-graph decoder (one capture) and its variants — the compiled layer-function prefill, the
    model-forward prefill, the compiled step, both compiled with tuned kernels — give exactly ``ref``'s tokens;
    returns the decoder."""
    dec = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=8)
    assert dec.cuda_graphs
    got = dec.generate(inputs, new_tokens).cpu()
    assert dec.n_graph_captures == 1
    assert torch.equal(got, ref), (got, ref)
    for options in ({"compile_prefill": True}, {"prefill": "model"}, {"compile_step": True}):
        other = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=8, **options).generate(inputs, new_tokens).cpu()
        assert torch.equal(other, ref), (options, other, ref)
    untuned = getattr(model, "jpcap_compile_tuning", False)
    model.jpcap_compile_tuning = True   # as model.compile_tuning: all loads it (tuned kernel launch configurations)
    try:
        tuned = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=8, compile_prefill=True, compile_step=True)
        assert torch.equal(tuned.generate(inputs, new_tokens).cpu(), ref)
    finally:
        model.jpcap_compile_tuning = untuned
    return dec

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_greedy_decoder_real_shape(project):
    """Qwen2-VL-2B's shape (random weights), 640×480 images at 448² pixels: CUDA-graph decoding gives
    HF greedy decoding's tokens (fp32: no rounding differences to flip an argmax)."""
    from conftest import qwen2_vl_2b_config
    from transformers import Qwen2VLForConditionalGeneration
    processor = copy_processor(project["processor"], 448 * 448)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration(qwen2_vl_2b_config(processor.tokenizer)).eval()
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(480, 640, 3, generator=gen) * 255).byte().numpy()) for _ in range(6)]
    inputs = generation.prepare_inputs(processor, [engine.build_prompt(ENTRY, processor)] * 6, images)
    cfg = generation.generation_config(model, 12, 1, [], 0)
    with torch.no_grad():
        ref = model.generate(**inputs.to("cuda"), generation_config=cfg)[:, inputs["input_ids"].shape[1]:].cpu()
    dec = check_graph_decoder_tokens(model, inputs, ref)
    # a smaller batch next (another batch-size bucket): a second graph, counters reset, same tokens
    fewer = generation.prepare_inputs(processor, [engine.build_prompt(ENTRY, processor)] * 3, images[:3], device="cuda")
    again = dec.generate(fewer, 12).cpu()
    assert dec.n_graph_captures == 2
    agree = (again == ref[:3]).float().mean().item()  # GPU-preprocessed pixels: tiny rounding differences
    assert agree >= 0.9, (again, ref[:3])
    del model
    torch.cuda.empty_cache()


def copy_processor(processor, max_pixels: int):
    import copy

    proc = copy.deepcopy(processor)
    proc.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
    return proc


def test_loader_threads_are_an_engine_option(project, tmp_path):
    """``EngineOptions.loader_threads`` sets how many threads read the JPEGs (0: the default, one fewer than
    the cores, at most 8); the summary says how many ran, and the captions do not depend on it."""
    import os

    kw = dict(batch_size=4, max_new_tokens=6, progress=False)
    records = project["records"][:6]
    two = engine.caption_records(project["model"], project["processor"], ENTRY, records, project["data"],
                                 tmp_path / "two.jsonl", options=EngineOptions(loader_threads=2), **kw)
    auto = engine.caption_records(project["model"], project["processor"], ENTRY, records, project["data"],
                                  tmp_path / "auto.jsonl", **kw)
    assert two["loader_threads"] == 2 and auto["loader_threads"] == max(1, min(8, (os.cpu_count() or 2) - 1))
    assert ({r["image_id"]: r["caption"] for r in _rows(tmp_path / "two.jsonl")}
            == {r["image_id"]: r["caption"] for r in _rows(tmp_path / "auto.jsonl")})


def test_the_fast_decoder_is_kept_for_the_next_call_with_the_same_weights(project, tmp_path):
    """A second call on the same model reuses the fast decoder (its buffers and captured graphs) and writes
    the same captions; other settings, swapped or replaced weights, or ``reuse_decoder=False`` get a new one."""
    import copy
    import gc
    import weakref

    kw = dict(batch_size=4, max_new_tokens=6, progress=False)
    records = project["records"][:6]
    model = copy.deepcopy(project["model"])

    def run(name, m=model, **extra):
        s = engine.caption_records(m, project["processor"], ENTRY, records, project["data"], tmp_path / name,
                                   **kw, **extra)
        kept = m.__dict__.get("_jpcap_greedy_decoder")
        return s, (kept.decoder if kept else None), {r["image_id"]: r["caption"] for r in _rows(tmp_path / name)}

    first, dec1, caps1 = run("a.jsonl")
    second, dec2, caps2 = run("b.jsonl")
    assert dec1 is not None and dec2 is dec1 and caps2 == caps1
    assert first["graph_captures"] == second["graph_captures"] == 0     # no CUDA graphs on the CPU
    other = engine.caption_records(model, project["processor"], ENTRY, records, project["data"],
                                   tmp_path / "c.jsonl", batch_size=2, max_new_tokens=6, progress=False)
    dec3 = model.__dict__["_jpcap_greedy_decoder"].decoder
    assert other["n_done"] == 6 and dec3 is not dec1 and dec3.max_batch == 2     # another batch size
    _, dec4, _ = run("d.jsonl")
    assert dec4 is not dec3 and dec4.max_batch == 4                          # one decoder kept per model
    with torch.no_grad():
        head = model.lm_head
        head.weight = torch.nn.Parameter(head.weight.detach().clone())   # a replaced weight
    _, dec5, caps5 = run("e.jsonl")
    assert dec5 is not dec4 and caps5 == caps1
    fresh = copy.deepcopy(model)                         # a copy keeps no decoder (no second set of buffers)
    assert fresh.__dict__["_jpcap_greedy_decoder"].decoder is None
    _, none, caps6 = run("f.jsonl", m=fresh, options=EngineOptions(reuse_decoder=False))
    assert none is None and caps6 == caps1               # reuse off: nothing kept
    _, dec7, _ = run("g.jsonl", m=fresh)
    gone = weakref.ref(dec7)
    del dec7
    gc.disable()
    try:                                                 # freed with its model, no collector needed (GPU memory)
        del fresh
        assert gone() is None
    finally:
        gc.enable()

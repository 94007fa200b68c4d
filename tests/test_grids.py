"""Canonical visual grids (``generation.grid_buckets``, engine/grids.py) and the engine warm-up
(``generation.warmup``, engine/warmup.py) on the offline tiny Qwen2-VL (random, scrambled weights: the
captions are junk but depend on the image, so equal rows mean equal computations)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from jpcap_helpers import engine
from jpcap_helpers import io as jio
from jpcap_helpers.data import toy as toydata
from jpcap_helpers.engine import generation, grids, pipeline, warmup
from jpcap_helpers.models import REGISTRY, build_tiny_model
from jpcap_helpers.params import Params, ParamsError, TinyModelParams

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
ENTRY = REGISTRY["tiny-qwen2-vl"]
# (width, height) → grids (h, w) under max_pixels 112²: 9 distinct grids, most images 4:3 landscape
SIZES = [(140, 112)] * 6 + [(112, 140)] * 3 + [(112, 112)] * 3 + [(196, 56), (56, 196), (140, 84), (84, 140),
                                                                     (60, 60), (168, 56)]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.test_engine import scramble_weights

    root = tmp_path_factory.mktemp("grids")
    data = root / "data"
    toydata.generate_jp_shapes(data, n_train=8, n_val=4, n_yj=2)
    model_dir = build_tiny_model(root / "models" / "tiny-qwen2-vl", toydata.all_caption_texts(data),
                                 TinyModelParams(), MIN_PIXELS, MAX_PIXELS)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    scramble_weights(model)
    images = root / "images"
    images.mkdir()
    records = []
    for i, (w, h) in enumerate(SIZES):
        pixels = (np.random.default_rng(i).random((h, w, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(images / f"p{i:02d}.png")
        records.append({"image_id": i, "file_name": f"p{i:02d}.png"})
    return {"model": model, "processor": AutoProcessor.from_pretrained(model_dir), "images": images,
            "records": records}


def _caption(project, out, records=None, **kw) -> dict:
    kw = {"batch_size": 4, "max_new_tokens": 6, "progress": False, **kw}
    return engine.caption_records(project["model"], project["processor"], ENTRY, records or project["records"],
                                  project["images"], out, **kw)


def _rows(path) -> dict:
    return {r["image_id"]: r["caption"] for r in jio.read_jsonl(path)}


def _natural(project) -> dict:
    out = {}
    for r in project["records"]:
        with Image.open(project["images"] / r["file_name"]) as im:
            out[r["image_id"]] = grids.natural_grid(project["processor"], im.height, im.width)
    return out


# ---- choosing the grids ---------------------------------------------------------------------

def test_choose_grids_keeps_the_frequent_shapes_and_is_deterministic():
    counts = {(336, 448): 50, (448, 336): 20, (308, 448): 10, (448, 308): 5, (392, 392): 3, (252, 504): 2}
    two = grids.choose_grids(counts, 2)
    assert two == sorted([(336, 448), (448, 336)])
    assert grids.choose_grids(dict(reversed(counts.items())), 2) == two   # order of the input does not matter
    assert grids.choose_grids(counts, 10) == sorted(counts)               # K ≥ distinct grids: all kept
    plan = grids.GridPlan(tuple(two))
    assert plan.target((308, 448)) == (336, 448) and plan.target((448, 308)) == (448, 336)
    assert plan.target((448, 336)) == (448, 336)
    assert 0 < plan.max_distortion(counts) < 0.5
    with pytest.raises(ValueError):
        grids.choose_grids(counts, 0)


def test_choose_grids_minimises_the_weighted_distance():
    """The k-medoids result is never worse than the K most frequent grids (the obvious alternative)."""
    rng = np.random.default_rng(0)
    counts = {(28 * int(h), 28 * int(w)): int(n) for h, w, n in zip(rng.integers(2, 17, 40), rng.integers(2, 17, 40),
                                                                   rng.integers(1, 100, 40))}
    for k in (1, 2, 4, 8):
        chosen = grids.choose_grids(counts, k)
        top = sorted(counts, key=lambda g: -counts[g])[:k]

        def cost(medoids):
            return sum(n * min(grids.grid_distance(g, m) for m in medoids) for g, n in counts.items())
        assert len(chosen) == k and cost(chosen) <= cost(top) + 1e-9


def test_a_moved_image_gets_its_canonical_grid_from_the_processor(project):
    processor = project["processor"]
    prompt = engine.build_prompt(ENTRY, processor)
    path = project["images"] / "p12.png"   # 196×56 → its own grid (56, 196)
    for target in [(84, 112), (112, 84), (56, 56)]:
        for image in (engine.load_image_for_model(path, size=target),
                      engine.images.load_image_tensor(path, pin=False, size=target)):
            inputs = generation.prepare_inputs(processor, [prompt], [image])
            h, w = (int(v) * 14 for v in inputs["image_grid_thw"][0, 1:])
            assert (h, w) == target


# ---- the engine with grid buckets -----------------------------------------------------------

def test_grid_buckets_bound_the_distinct_grids(project, tmp_path, monkeypatch):
    natural = _natural(project)
    assert len(set(natural.values())) == 9
    seen = []
    real = generation.prepare_inputs

    def spy(processor, prompts, images, **kw):
        inputs = real(processor, prompts, images, **kw)
        seen.append(inputs["image_grid_thw"])
        return inputs

    monkeypatch.setattr(pipeline, "prepare_inputs", spy)
    for k in (1, 2, 3):
        seen.clear()
        s = _caption(project, tmp_path / f"k{k}.jsonl", grid_buckets=k)
        thw = {tuple(int(v) for v in row) for batch in seen for row in batch}
        assert len(thw) <= k and s["n_grids"] == len(thw) and s["n_errors"] == 0
        canonical = {tuple(g) for g in s["canonical_grids"]}
        assert len(canonical) == k and s["grid_buckets"] == k
        assert s["n_resized"] == sum(g not in canonical for g in natural.values()) > 0
    assert (84, 112) in canonical   # the most frequent shape (140×112, six images) is kept


def test_grid_buckets_off_or_not_binding_give_the_rows_of_before(project, tmp_path):
    before = _caption(project, tmp_path / "off.jsonl")
    assert before["n_resized"] == 0 and before["n_grids"] == 9 and before["canonical_grids"] is None
    many = _caption(project, tmp_path / "k9.jsonl", grid_buckets=9)   # every grid canonical: nothing moves
    assert many["n_resized"] == 0
    assert _rows(tmp_path / "off.jsonl") == _rows(tmp_path / "k9.jsonl")
    moved = _caption(project, tmp_path / "k2.jsonl", grid_buckets=2)
    diff = {i for i, c in _rows(tmp_path / "k2.jsonl").items() if c != _rows(tmp_path / "off.jsonl")[i]}
    assert moved["n_resized"] > 0 and diff, "moving images to other grids changes their captions"


def test_grids_are_chosen_from_all_records_so_a_resume_keeps_them(project, tmp_path):
    whole = _caption(project, tmp_path / "whole.jsonl", grid_buckets=2)
    part = tmp_path / "part.jsonl"
    rows = list(jio.read_jsonl(tmp_path / "whole.jsonl"))
    jio.atomic_write_jsonl(part, [r for r in rows if r["image_id"] < 10])   # a run killed half-way
    resumed = _caption(project, part, grid_buckets=2)
    assert resumed["canonical_grids"] == whole["canonical_grids"] and resumed["n_skipped_existing"] == 10
    assert _rows(part) == _rows(tmp_path / "whole.jsonl")


# ---- the warm-up ----------------------------------------------------------------------------

def test_warmup_shapes_one_per_grid_and_bucket_longest_first():
    def item(key):
        return pipeline.Item(0, "x", None, key=key)
    batches = [[item((16, 112, 112))] * 8, [item((16, 112, 112))] * 3, [item((12, 84, 112))] * 8,
               [item((12, 84, 112))] * 8, [item((4, 56, 56))]]
    shapes = warmup.warmup_shapes(batches, max_batch=8)
    assert shapes == [((16, 112, 112), 5), ((16, 112, 112), 3), ((12, 84, 112), 5), ((4, 56, 56), 1)]
    assert warmup.bucket_floor(6, 6) == 5 and warmup.bucket_floor(4, 6) == 3 and warmup.bucket_floor(1, 6) == 1


def test_warmup_does_not_change_rows_and_is_timed_apart(project, tmp_path, monkeypatch):
    cold = _caption(project, tmp_path / "cold.jsonl", grid_buckets=3)
    calls = []
    real = warmup.generate_batch
    monkeypatch.setattr(warmup, "generate_batch", lambda p, inputs, d: calls.append(inputs) or real(p, inputs, d))
    warm = _caption(project, tmp_path / "warm.jsonl", grid_buckets=3, warmup=True)
    assert _rows(tmp_path / "cold.jsonl") == _rows(tmp_path / "warm.jsonl")
    assert warm["decoder"] == "static-cache greedy" and warm["warmup"] is True and cold["warmup"] is False
    assert cold["warmup_seconds"] == 0 and warm["warmup_seconds"] > 0
    # one blank batch per distinct (grid, bucket) of the run's batches (batch size 4: buckets 4, 2, 1)
    assert 3 <= len(calls) <= 3 * 3
    lengths = [int(c["input_ids"].shape[1]) for c in calls]
    assert lengths == sorted(lengths, reverse=True), "the longest prompt first (buffers sized once)"
    hf = _caption(project, tmp_path / "hf.jsonl", warmup=True, decoder="hf")
    assert hf["warmup_seconds"] == 0   # HF generate captures nothing: no warm-up


def test_a_shard_warms_the_shapes_of_the_whole_run(project, tmp_path, monkeypatch):
    """Under sharding each process warms what one GPU would (``warmup_batches``: the whole run's planned
    batches): a process warmed on its own share alone met new shapes inside its timed run (run X2-8: one
    3–4 s batch on one of 2 GPUs)."""
    warmed = []
    monkeypatch.setattr(pipeline, "warm_up", lambda captioner, batches: warmed.append(
        warmup.warmup_shapes(batches, captioner.decoder.fast.max_batch)) or (0.0, 0))
    share = [r for r in project["records"] if SIZES[r["image_id"]] == (140, 112)]   # one grid only
    own = _caption(project, tmp_path / "own.jsonl", records=share, warmup=True)
    planned = pipeline.plan_batches(project["model"], project["processor"], ENTRY, project["records"],
                                    project["images"], batch_size=4)
    every = _caption(project, tmp_path / "every.jsonl", records=share, warmup=True, warmup_batches=planned)
    whole = _caption(project, tmp_path / "whole.jsonl", warmup=True)
    assert len({key for key, _ in warmed[0]}) == 1 and own["n_done"] == every["n_done"] == len(share)
    assert warmed[1] == warmed[2] and len({key for key, _ in warmed[1]}) == 9   # the one-GPU run's: every grid
    assert _rows(tmp_path / "every.jsonl") == {k: v for k, v in _rows(tmp_path / "whole.jsonl").items()
                                               if k in {r["image_id"] for r in share}}
    assert whole["n_batches"] >= 9 and len(whole["slowest_batches"]) == 3


def test_the_first_batches_are_read_while_the_warmup_runs(project, tmp_path, monkeypatch):
    """With ``warmup`` the loader threads decode the first two batches' images during the warm-up, so the
    timed run does not begin by waiting for them (run X4-2: on 4 GPUs the processes whose first batch held
    256 images were the slow ones); ``fill_seconds`` reports that wait, with or without a warm-up."""
    planned = pipeline.plan_batches(project["model"], project["processor"], ENTRY, project["records"],
                                    project["images"], batch_size=4)
    first_two = len(planned[0]) + len(planned[1])
    loaded, seen_in_warmup = [], []
    real_load = pipeline.BatchCaptioner.load
    monkeypatch.setattr(pipeline.BatchCaptioner, "load",
                        lambda self, item: loaded.append(item.image_id) or real_load(self, item))

    def warm_up(captioner, batches):
        first = warmup.warmup_shapes(batches, captioner.decoder.fast.max_batch)
        deadline = time.monotonic() + 20
        while len(loaded) < first_two and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_in_warmup.append(len(loaded))
        return 0.0, len(first)

    monkeypatch.setattr(pipeline, "warm_up", warm_up)
    warm = _caption(project, tmp_path / "warm.jsonl", warmup=True)
    assert seen_in_warmup == [first_two], "the first two batches' images were not read while the warm-up ran"
    assert 0 <= warm["fill_seconds"] <= warm["seconds"]
    loaded.clear()
    cold = _caption(project, tmp_path / "cold.jsonl")
    assert 0 < cold["fill_seconds"] <= cold["seconds"] and loaded   # no warm-up: the run reads them itself
    assert _rows(tmp_path / "warm.jsonl") == _rows(tmp_path / "cold.jsonl")


def test_summary_and_provenance_record_the_settings(project, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    s = _caption(project, out, grid_buckets=2, warmup=True)
    for key in ("warmup_seconds", "n_grids", "n_resized", "grid_buckets", "warmup", "canonical_grids"):
        assert key in s
    meta = json.loads(engine.write_prediction_meta(out, ENTRY, s).read_text())
    assert meta["generation"]["grid_buckets"] == 2 and meta["generation"]["warmup"] is True
    assert meta["last_run"]["n_resized"] == s["n_resized"]
    # resumed under another grid_buckets: the file mixes two settings and says so
    engine.write_prediction_meta(out, ENTRY, {**s, "grid_buckets": 0, "n_skipped_existing": 5})
    assert json.loads(out.with_suffix(".meta.json").read_text())["generation"]["grid_buckets_mixed"] is True


# ---- params ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, match", [
    ("grid_buckets", -1, "generation.grid_buckets: must be ≥ 0"),
    ("grid_buckets", 65, "generation.grid_buckets: must be"),
    ("grid_buckets", "4", "generation.grid_buckets: expected int"),
    ("grid_buckets", 2.5, "generation.grid_buckets: expected int"),
    ("warmup", "yes", "generation.warmup: expected bool"),
    ("warmup_s", True, "unknown key generation.warmup_s"),
])
def test_bad_generation_params_name_the_key(key, value, match):
    with pytest.raises(ParamsError, match=match):
        Params.from_dict({"generation": {key: value}}, check_paths=False)
    ok = Params.from_dict({"generation": {"grid_buckets": 4, "warmup": True}}, check_paths=False)
    assert (ok.generation.grid_buckets, ok.generation.warmup) == (4, True)
    assert (Params().generation.grid_buckets, Params().generation.warmup) == (0, False)



def _spy_decoders(monkeypatch) -> list:
    """The Decoder objects caption_records makes, and what their fast decoder held after the warm-up."""
    made = []
    real_warm_up = pipeline.warm_up

    class Spy(generation.Decoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append({"decoder": self})

    def warm_up(captioner, batches):
        out = real_warm_up(captioner, batches)
        fast = captioner.decoder.fast
        made[-1].update(capacity=fast.capacity, captures=fast.n_graph_captures, graphs=set(fast._graphs))
        return out

    monkeypatch.setattr(pipeline, "Decoder", Spy)
    monkeypatch.setattr(pipeline, "warm_up", warm_up)
    return made


def test_after_the_warmup_the_run_allocates_no_new_buffers(project, tmp_path, monkeypatch):
    """The warm-up sizes the decoder's KV buffers for the longest prompt first: the timed run then never
    re-allocates them (on a GPU a re-allocation drops every captured graph)."""
    prompt = engine.build_prompt(ENTRY, project["processor"])
    lengths = [generation.prepare_inputs(project["processor"], [prompt], [Image.new("RGB", size)])["input_ids"].shape[1]
               for size in set(SIZES)]
    # the KV capacity is rounded up to 64 positions: pick the caption length so that the prompts straddle
    # a boundary (a run meeting the longest prompt only after the warm-up would have to re-allocate)
    max_new = -(-(min(lengths) + 1) // 64) * 64 - min(lengths)
    assert max(lengths) + max_new > min(lengths) + max_new > 0 and max(lengths) > min(lengths)
    made = _spy_decoders(monkeypatch)
    _caption(project, tmp_path / "w.jsonl", warmup=True, max_new_tokens=max_new)   # 9 grids, batch 4
    fast = made[-1]["decoder"].fast
    assert made[-1]["capacity"] >= max(lengths) + max_new and fast.capacity == made[-1]["capacity"]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_warmup_captures_every_graph_up_front(project, tmp_path, monkeypatch):
    """On CUDA: after the warm-up the run captures no further graph, and its rows equal a run without
    warm-up (CPU-preprocessed pixels in both, so only the warm-up differs)."""
    import copy

    model = copy.deepcopy(project["model"]).to("cuda")
    kw = dict(batch_size=4, max_new_tokens=6, progress=False, options=engine.EngineOptions(preprocess_on_gpu=False))
    args = (model, project["processor"], ENTRY, project["records"], project["images"])
    engine.caption_records(*args, tmp_path / "cold.jsonl", grid_buckets=3, **kw)
    made = _spy_decoders(monkeypatch)
    s = engine.caption_records(*args, tmp_path / "warm.jsonl", grid_buckets=3, warmup=True, **kw)
    fast = made[-1]["decoder"].fast
    assert fast.cuda_graphs and made[-1]["captures"] >= 1 and s["warmup_seconds"] > 0
    assert fast.n_graph_captures == made[-1]["captures"] and set(fast._graphs) == made[-1]["graphs"]
    assert _rows(tmp_path / "cold.jsonl") == _rows(tmp_path / "warm.jsonl")

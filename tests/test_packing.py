"""Caption packing (``train.pack_captions``) on the tiny Qwen2-VL (CPU, fp32): the packed loss and its
gradients equal the plain transformers loss over the same captions (LoRA, trainable projector, 4-bit),
with captions of different lengths and images of different sizes in one batch; a wrong mask or wrong
positions break that; epochs see every caption once; packed training resumes on the same curve."""
from __future__ import annotations

import pytest
import torch

from jpcap_helpers import train as T
from jpcap_helpers.params import Params, ParamsError
from jpcap_helpers.train import loss as loss_module
from jpcap_helpers.train import packing
from tests.test_train import Killed, _fresh, kill_at, make_params, unpatched_copy
from tests.test_train import project as project  # noqa: F811  (the module-scoped fixture, reused)

SIZES = [(112, 112), (84, 56), (56, 112)]   # three image grids in one batch


def packed_samples(params, n_images: int, per_image: int) -> list[dict]:
    """``n_images`` toy images (resized to different grids) with ``per_image`` of their captions each."""
    pairs, _ = T.read_pairs(params)
    groups = packing.group_by_image(pairs)
    ds = T.PairDataset(pairs, params.images_dir)
    out = []
    for g, size in zip(groups[:n_images], SIZES):
        item = ds[g[0]]
        out.append({"image": item["image"].resize(size), "image_id": item["image_id"],
                    "captions": [pairs[i]["caption"] for i in g[:per_image]]})
    return out


def unpacked(samples: list[dict]) -> list[dict]:
    return [{"image": s["image"], "caption": c, "image_id": s["image_id"]} for s in samples for c in s["captions"]]


def perturbed_model(project, **train):
    params, model, processor, entry = _fresh(project, top_k_layers="all", projector="trainable", **train)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():      # non-zero LoRA B so the adapters matter
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return params, model, processor, entry


def grads(model) -> dict:
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def check_packed_equals_plain(model, reference, processor, entry, samples, rtol=1e-5, grad_rtol=1e-4):
    packed = packing.PackedCollator(processor, entry.prompt)(samples)
    plain = T.CaptionCollator(processor, entry.prompt, "right")(unpacked(samples))
    s, n = T.caption_loss(model, packed)
    (s / n).backward()
    packed_grads = grads(model)
    ref = T.plain_loss(reference, plain)
    ref.backward()
    plain_grads = grads(reference)
    assert int(n) == packing.target_count(plain) == packing.target_count(packed)
    assert (s / n).item() == pytest.approx(ref.item(), rel=rtol)
    assert packed_grads.keys() == plain_grads.keys() and packed_grads
    for k, g in packed_grads.items():
        torch.testing.assert_close(g, plain_grads[k], rtol=grad_rtol, atol=1e-6, msg=k)
    return packed, plain


def test_packed_loss_and_gradients_equal_plain(project):
    params, model, processor, entry = perturbed_model(project)
    reference = unpatched_copy(model)
    samples = packed_samples(params, 3, 5)
    packed, plain = check_packed_equals_plain(model, reference, processor, entry, samples)
    # the layout the test relies on: captions of different lengths, three image grids, shorter rows
    lengths = {int((packed["segment_ids"] == j).sum()) for j in range(1, 6)}
    assert len(lengths) > 1 and len({tuple(g) for g in packed["image_grid_thw"].tolist()}) == 3
    assert packed["input_ids"].numel() < plain["input_ids"].numel() / 2
    # the inputs_embeds route for older transformers gives the same loss
    with torch.no_grad():
        s, n = T.caption_loss(model, packed)
        s2, n2 = T.caption_loss(model, packed, use_mm_encoder_outputs=False)
    assert (s2 / n2).item() == pytest.approx((s / n).item(), rel=1e-6)
    # rows are padded to a multiple of T.PAD_MULTIPLE tokens; padded only to the longest row: same loss
    tight = packing.PackedCollator(processor, entry.prompt, pad_multiple=1)(samples)
    assert packed["input_ids"].shape[1] % T.PAD_MULTIPLE == 0
    assert tight["input_ids"].shape[1] == int(tight["attention_mask"].sum(1).max())
    with torch.no_grad():
        s3, n3 = T.caption_loss(model, tight)
    assert int(n3) == int(n) and (s3 / n3).item() == pytest.approx((s / n).item(), rel=1e-5)


def test_packed_with_a_single_caption_and_uneven_caption_counts(project):
    params, model, processor, entry = perturbed_model(project)
    reference = unpatched_copy(model)
    samples = packed_samples(params, 3, 5)
    samples[0]["captions"] = samples[0]["captions"][:1]
    samples[2]["captions"] = samples[2]["captions"][:3]
    check_packed_equals_plain(model, reference, processor, entry, samples)


def test_a_wrong_mask_or_wrong_positions_break_equality(project, monkeypatch):
    """The exactness test can fail: captions that see each other, or positions that run on across
    captions (as a plain concatenation would give), change the loss."""
    params, model, processor, entry = perturbed_model(project)
    samples = packed_samples(params, 2, 4)
    packed = packing.PackedCollator(processor, entry.prompt)(samples)
    plain = T.CaptionCollator(processor, entry.prompt, "right")(unpacked(samples))
    with torch.no_grad():
        ref = T.plain_loss(model, plain).item()
        s, n = T.caption_loss(model, packed)
        assert (s / n).item() == pytest.approx(ref, rel=1e-5)

        def causal_only(seg, float_dtype=None):       # every caption sees the captions before it
            length = seg.shape[1]
            m = torch.ones(length, length, dtype=torch.bool).tril()
            return (m[None] & ((seg[:, None, :] >= 0) | torch.eye(length, dtype=torch.bool)))[:, None]

        monkeypatch.setattr(loss_module, "packed_attention_mask", causal_only)
        s, n = T.caption_loss(model, packed)
        assert abs((s / n).item() - ref) > 1e-3
        monkeypatch.undo()

        seg = packed["segment_ids"]                   # positions that continue across captions
        run = torch.cumsum((seg > 0).long(), 1) - 1 - packed["caption_pos"]
        running = packed["position_ids"] + torch.where(seg > 0, run, 0).unsqueeze(0)
        s, n = T.caption_loss(model, dict(packed, position_ids=running))
        assert abs((s / n).item() - ref) > 1e-4


def test_packed_4bit_loss_and_gradients_equal_plain(project):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    params, model, processor, entry = perturbed_model(project, load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    samples = packed_samples(params, 3, 5)
    # the same 4-bit model computes both (its weights cannot be deep-copied unpatched): the plain
    # transformers forward with labels through the patched modules
    check_packed_equals_plain(model, model, processor, entry, samples, rtol=1e-5, grad_rtol=1e-4)


def test_tokens_equal_the_unpacked_rows(project):
    params, _, processor, entry = _fresh(project)
    samples = packed_samples(params, 2, 5)
    packed = packing.PackedCollator(processor, entry.prompt)(samples)
    plain = T.CaptionCollator(processor, entry.prompt, "right")(unpacked(samples))
    row = 0
    for i, s in enumerate(samples):
        seg, ids = packed["segment_ids"][i], packed["input_ids"][i]
        for j in range(1, len(s["captions"]) + 1):
            alone = plain["input_ids"][row][plain["attention_mask"][row].bool()]
            mine = torch.cat([ids[seg == 0], ids[seg == j]])
            assert alone[:len(mine)].tolist() == mine.tolist()
            row += 1


def test_epoch_samples_hold_every_caption_once():
    pairs = [{"image_id": i // 5 if i < 23 else 99, "caption": str(i)} for i in range(26)]
    for k in (0, 1, 2, 5):
        samples = packing.PackedSamples(pairs, k, seed=3)
        for epoch in (0, 1):
            chunks = samples.for_epoch(epoch)
            assert len(chunks) == len(samples)
            assert sorted(i for c in chunks for i in c) == list(range(26))
            assert all(len({pairs[i]["image_id"] for i in c}) == 1 for c in chunks)
            assert all(len(c) <= (k or 5) for c in chunks)
            assert chunks == packing.PackedSamples(pairs, k, seed=3).for_epoch(epoch)   # deterministic
        if k == 2:
            assert samples.for_epoch(0) != samples.for_epoch(1)
    assert len(packing.PackedSamples(pairs, 0, 0)) == 6


def test_params_validation():
    with pytest.raises(ParamsError, match="train.captions_per_image"):
        Params.from_dict({"train": {"captions_per_image": 2}})
    with pytest.raises(ParamsError, match="train.captions_per_image"):
        Params.from_dict({"train": {"pack_captions": True, "captions_per_image": -1}})
    with pytest.raises(ParamsError, match="train.pack_captions"):
        Params.from_dict({"train": {"pack_captions": True}, "model": {"attn_implementation": "flash_attention_2"}})
    assert Params.from_dict({"train": {"pack_captions": True, "captions_per_image": 2}}).train.captions_per_image == 2


PACK_KW = dict(max_steps=4, save_every=2, lora_dropout=0.1, top_k_layers=2, micro_batch_size=2,
               effective_batch_size=4, pack_captions=True, captions_per_image=2)


def test_packed_training_resumes_on_the_same_curve(project):
    ref = T.train(make_params(project, "packed-ref", **PACK_KW), resume=False)
    assert sorted(ref.losses) == [1, 2, 3, 4]
    params = make_params(project, "packed-killed", **PACK_KW)
    with pytest.raises(Killed):
        T.train(params, resume=False, callbacks=[kill_at(3)])
    resumed = T.train(params)
    assert resumed.resumed_from_step == 2
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(ref.losses[step], abs=1e-5), step
    log = T.read_train_log(params.run_dir)
    assert log["step"].tolist() == [1, 2, 3, 4] and (log["captions_per_s"] > 0).all()


def test_plan_counts_packed_samples_and_costs_per_caption(project):
    unpacked = T.plan(make_params(project, "plan-unpacked", max_steps=2))
    packed = T.plan(make_params(project, "plan-packed", max_steps=2, pack_captions=True))
    assert packed["captions_per_sample"] == pytest.approx(packed["n_train_pairs"] / packed["n_train_images"])
    assert packed["steps_per_epoch"] == packed["n_train_images"] // packed["effective_batch_size"]
    assert unpacked["captions_per_sample"] == 1 and unpacked["steps_per_epoch"] == unpacked["n_train_pairs"] // 8
    # the cost model per caption: the image and the prefix are shared by the packed captions
    assert packed["cost_model_t4"]["tflop_per_sample"] < unpacked["cost_model_t4"]["tflop_per_sample"] / 2
    assert "packed: a sample is an image" in T.format_plan(packed)


def test_a_missing_image_trains_nothing_and_is_counted_per_caption(project):
    params, _, processor, entry = _fresh(project)
    samples = packed_samples(params, 2, 3)
    whole = packing.PackedCollator(processor, entry.prompt)(samples)
    samples[1] = {"image": None, "missing": "gone.jpg", "captions": samples[1]["captions"], "image_id": 0}
    batch = packing.PackedCollator(processor, entry.prompt)(samples)
    assert batch["missing_images"] == ["gone.jpg"] * 3 and int(batch["n_captions"]) == 3
    rows = batch["target_index"] // batch["input_ids"].shape[1]
    assert (rows == 0).all() and packing.target_count(batch) == int((whole["target_index"] < whole["input_ids"].shape[1]).sum())
    assert not (batch["segment_ids"][1] > 0).any()


# ---------------------------------------------------------------------------------------------
# GPU (the lead runs these): the real Qwen2-VL-2B shape
# ---------------------------------------------------------------------------------------------

REAL_SIZES = [(448, 336), (336, 448), (392, 392)]   # three grids, landscape/portrait/square


def real_shape_params(project, tmp_path_factory, run: str, **train):
    from pathlib import Path

    from jpcap_helpers import models
    from tests.test_train import real_shape_model_dir

    tiny_params = make_params(project, "tok")
    models.ensure_tiny_model(tiny_params)
    folder = tmp_path_factory.getbasetemp() / "qwen2vl-2b-random"
    if not (folder / "config.json").exists():
        real_shape_model_dir(folder, Path(models.model_path(tiny_params, "tiny-qwen2-vl")))
    params = make_params(project, run, **train)
    params.model.name, params.model.max_pixels = str(folder), 448 * 448
    return params


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_real_shape_packed_equals_plain(project, tmp_path_factory, monkeypatch):
    """Qwen2-VL-2B's shape (random weights, fp32): packed loss = mean of the plain per-caption losses
    and the LoRA/projector gradients match, three image grids and uneven caption counts in one batch."""
    from tests.test_train import perturbed_with_reference

    params = real_shape_params(project, tmp_path_factory, "gpu-pack-equiv", top_k_layers=6, lora_rank=32,
                               lora_alpha=32, projector="trainable")
    params.model.precision, params.model.compile = "fp32", False
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # the plain Conv3d in full fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, processor, entry, reference = perturbed_with_reference(params)
    pairs, _ = T.read_pairs(params)
    groups = packing.group_by_image(pairs)
    ds = T.PairDataset(pairs, params.images_dir)
    smp = []
    for g, size, k in zip(groups, REAL_SIZES, (5, 2, 4)):
        item = ds[g[0]]
        smp.append({"image": item["image"].resize(size), "image_id": item["image_id"],
                    "captions": [pairs[i]["caption"] for i in g[:k]]})
    packed = packing.PackedCollator(processor, entry.prompt)(smp)
    plain = T.CaptionCollator(processor, entry.prompt, "right")(unpacked(smp))
    assert len({tuple(g) for g in packed["image_grid_thw"].tolist()}) == 3
    to_gpu = lambda b: {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    s, n = T.caption_loss(model, to_gpu(packed))
    (s / n).backward()
    ref = T.plain_loss(reference, to_gpu(plain))
    ref.backward()
    assert (s / n).item() == pytest.approx(ref.item(), rel=1e-4)
    ref_grads = dict(reference.named_parameters())
    checked = 0
    for k, p in model.named_parameters():
        if p.requires_grad:
            err = (p.grad - ref_grads[k].grad).norm() / ref_grads[k].grad.norm().clamp_min(1e-30)
            assert err < 1e-3, (k, float(err))
            checked += 1
    assert checked > 0
    del model, reference
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_real_shape_packed_training_stays_finite(project, tmp_path_factory, precision):
    """The T4 recipe with packing (4-bit, gradient checkpointing) in fp16 (as on a T4, GradScaler) and
    bf16: 12 steps of the real shape give finite losses and gradient norms."""
    import math

    params = real_shape_params(project, tmp_path_factory, f"gpu-pack-{precision}", load_in_4bit=True, max_steps=12,
                               micro_batch_size=2, effective_batch_size=4, top_k_layers=6, lora_rank=32,
                               lora_alpha=32, lora_dropout=0.05, gradient_checkpointing=True, learning_rate=2e-4,
                               pack_captions=True, captions_per_image=0)
    params.model.precision = precision
    result = T.train(params, resume=False)
    log = T.read_train_log(params.run_dir)
    assert log["loss"].map(math.isfinite).all(), log[["step", "loss", "skipped"]]
    assert log["grad_norm"].dropna().map(math.isfinite).tail(4).all(), log[["step", "grad_norm", "skipped"]]
    assert (log["skipped"] == "non-finite loss").sum() == 0
    assert result.steps == 12 and (log["captions_per_s"] > 0).all()
    print(f"packed {precision}: peak {result.peak_memory_gib:.1f} GiB, losses "
          f"{[round(v, 3) for v in result.losses.values()]}")

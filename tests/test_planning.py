"""The plan's probe (train/planning.py) times steps only after warm-up: a slow first micro-batch (what
torch.compile and CUDA-graph capture cause on a GPU; faked here on the CPU) and a slow first optimizer
step are left out of the steady step time, reported as ``probe_warmup_s`` and counted once in the ETA."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from jpcap_helpers import train as T
from jpcap_helpers.train import planning
from tests.test_train import make_params, project  # noqa: F401  (fixture)

SLOW = {1: 1.5, 2: 0.8}     # the first micro-batches: compile, then the dynamic-shape recompile
BASE = 0.1                  # a steady micro-batch's seconds on the fake clock


def _slow_start(monkeypatch, slow: dict[int, float], opt_slow: float = 0.0) -> dict:
    """The probe reads a fake clock that only the (real) micro-batches and optimizer steps advance — ``BASE``
    seconds each, plus ``slow``'s for the first micro-batches and ``opt_slow`` for the first optimizer
    step — so the machine's speed and load do not enter (a busy 2-core runner once took 0.36 s a step)."""
    calls, clock = {"micro": 0, "opt": 0}, {"now": 0.0}
    real_fb, real_opt = planning.forward_backward, planning._time_optimizer_step
    monkeypatch.setattr(planning, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))

    def forward_backward(session, micro, n_tokens):
        calls["micro"] += 1
        out = real_fb(session, micro, n_tokens)
        clock["now"] += BASE + slow.get(calls["micro"], 0.0)
        return out

    def optimizer_step(session):
        calls["opt"] += 1
        seconds, skipped = real_opt(session)
        return seconds + (opt_slow if calls["opt"] == 1 else 0.0), skipped

    monkeypatch.setattr(planning, "forward_backward", forward_backward)
    monkeypatch.setattr(planning, "_time_optimizer_step", optimizer_step)
    return calls


def test_probe_times_steps_after_warm_up_and_counts_it_once(project, monkeypatch):  # noqa: F811
    params = make_params(project, "probe", max_steps=200, eval_every=0)
    calls = _slow_start(monkeypatch, SLOW, opt_slow=2.0)
    info = T.plan(params, session_hours=None)
    accum = info["accumulation_steps"]
    # the steady step holds none of the slow start (the old probe took the median of micro-batches 2-3)
    assert info["probe_micro_batch_s"] < 0.3 and info["step_s"] < accum * 0.3 + 0.3
    assert info["probe_optimizer_step_s"] < 1.0
    assert info["probe_warmup_s"] >= sum(SLOW.values()) + 2.0
    assert info["probe_warmup_micro_batches"] >= 3 and calls["micro"] == info["probe_warmup_micro_batches"] + 3
    # ETA = steady steps + the warm-up's extra time once
    assert info["steady_s"] == pytest.approx(200 * info["step_s"])
    assert info["eta_s"] == pytest.approx(info["steady_s"] + info["probe_warmup_extra_s"])
    assert sum(SLOW.values()) + 2.0 - 0.5 < info["probe_warmup_extra_s"] <= info["probe_warmup_s"]
    text = T.format_plan(info)
    assert "warm-up micro-batches" in text and "warm-up once" in text and "steady steps" in text


def test_probe_warm_up_is_bounded(project, monkeypatch):  # noqa: F811
    """Step times that never settle stop the warm-up after PROBE_MAX_WARMUP micro-batches."""
    params = make_params(project, "probe-bounded", max_steps=10, eval_every=0)
    never = {i: (0.25 if i % 2 else 0.0) for i in range(1, planning.PROBE_MAX_WARMUP + 1)}
    _slow_start(monkeypatch, never)
    info = T.plan(params, session_hours=None)
    assert info["probe_warmup_micro_batches"] == planning.PROBE_MAX_WARMUP


def test_probe_warm_up_stops_once_stable(project, monkeypatch):  # noqa: F811
    params = make_params(project, "probe-stable", max_steps=10, eval_every=0)
    _slow_start(monkeypatch, {})
    monkeypatch.setattr(planning, "_compiled", lambda session: True)   # as on a GPU of capability ≥ 8.0
    info = T.plan(params, session_hours=None)
    # no slow start: every distinct probe batch once, then stop as soon as two agree
    assert planning.PROBE_DISTINCT_BATCHES <= info["probe_warmup_micro_batches"] < planning.PROBE_MAX_WARMUP
    assert info["cudagraphs_tip"] and info["cudagraphs_tip"] in T.format_plan(info)   # the plan prints the tip


def test_probe_slots_meet_other_grids_when_grouped():
    a, b, c = (16, 12), (12, 16), (14, 14)
    # grouped by grid: micro-batches 0-2 of grid a, 3 mixes a and b, 4 is b, 5 is c
    grids = np.array([a] * 12 + [a, b, b, b] + [b] * 4 + [c] * 4)
    assert planning.probe_slots(len(grids), 4, grids) == [0, 3, 5]     # the first of a, then new grids
    assert planning.probe_slots(len(grids), 4, None) == [0, 1, 2]      # not grouped: the first three
    assert planning.probe_slots(len(grids), 4, grids, scan=3) == [0, 1, 2]   # none new within the scan
    assert planning.probe_slots(len(grids), 4, np.array([a] * 24)) == [0, 1, 2]   # one grid
    assert planning.probe_slots(6, 4, np.array([a] * 3 + [b] * 3)) == [0, 1, 0]  # two slots: cycled


def test_probe_slots_meet_the_runs_padded_lengths_under_cudagraphs():
    """train.cudagraphs: first the micro-batches that bring a padded length not met yet (each one a compiled,
    recorded shape), up to the cap, over the whole epoch; then new grids up to three slots."""
    a, b = (16, 12), (12, 16)
    grids = np.array([a] * 12 + [b] * 12)
    lengths = np.array([96, 96, 64, 96, 64, 128])
    assert planning.probe_slots(24, 4, grids, lengths[:5]) == [0, 2, 3]      # lengths 96, 64, then grid b
    assert planning.probe_slots(24, 4, grids, lengths) == [0, 2, 5]          # 96, 64, 128 (grid b too): full
    assert planning.probe_slots(24, 4, None, lengths) == [0, 2, 5]           # 96, 64, 128
    assert planning.probe_slots(24, 4, None, lengths, max_lengths=2) == [0, 2, 1]   # capped: then the first others
    many = np.arange(10) * 32
    assert planning.probe_slots(40, 4, None, many, max_lengths=8) == list(range(8))  # more slots than three


@pytest.mark.parametrize("multiple", [T.CUDAGRAPH_PAD_MULTIPLE, 8])
def test_run_shapes_are_the_loaders_shapes(project, monkeypatch, multiple):  # noqa: F811
    """train.cudagraphs: each sample's counted tokens are its collated row's, and the run's counted batch
    shapes are exactly those its loader yields (micro-batches padded to the cudagraph multiple; 8 as well,
    which gives the tiny rows several shapes)."""
    from jpcap_helpers.train import session as session_module
    from jpcap_helpers.train.session import open_session
    from jpcap_helpers.train.shapes import run_shapes, sample_tokens

    monkeypatch.setattr(session_module, "CUDAGRAPH_PAD_MULTIPLE", multiple)

    params = make_params(project, "shapes", cudagraphs=True, group_by_grid=True, eval_images=0,
                         micro_batch_size=2, effective_batch_size=4, max_steps=14)
    session = open_session(params)
    try:
        batches, _, samples = planning._collate_probe_batches(session)
        tokens = sample_tokens(session, batches[0], samples[0])
        assert tokens is not None
        per_epoch, seen, rows = session.steps_per_epoch, set(), 0
        for epoch in range(-(-session.total_steps // per_epoch)):
            last = min(per_epoch, session.total_steps - epoch * per_epoch)
            order = session.sample_order(epoch)
            for k, batch in enumerate(session.loader(epoch, 0, last)):
                idx = order[k * 2:(k + 1) * 2]
                assert batch["attention_mask"].sum(dim=1).tolist() == tokens[idx].tolist()
                seen.add(tuple(batch["input_ids"].shape))
                rows += 2
        assert rows == 4 * session.total_steps and all(n % multiple == 0 for _, n in seen)
        assert run_shapes(session, tokens, 0, multiple) == seen and (len(seen) >= 2 or multiple > 8)
        # from a later step: the shapes of the steps still to run only
        assert run_shapes(session, tokens, session.total_steps - 1, multiple) <= seen
    finally:
        session.close()


@pytest.mark.parametrize("case", ["all-warmed", "capped", "one-shape"])
def test_plan_counts_new_batch_shapes_under_cudagraphs(project, monkeypatch, case):  # noqa: F811
    """With CUDA graphs (faked on the CPU) the probe collates micro-batches of every padded length epoch 0
    holds, up to PROBE_MAX_SHAPES, so its warm-up pays the shapes the run would meet mid-run; the ETA adds one
    compilation per shape beyond the probe's, at the warm-up's measured cost per further shape; where the probe
    met one shape that cost is unknown and the plan says the ETA leaves it out. Off a GPU the plan says CUDA
    graphs are not used. Rows padded to 1 token here: the tiny captions then give several shapes."""
    from jpcap_helpers.train import session as session_module

    params = make_params(project, f"probe-cg-{case}", cudagraphs=True, group_by_grid=True, eval_images=0,
                         micro_batch_size=2, effective_batch_size=4, max_steps=60, eval_every=0)
    monkeypatch.setattr(session_module, "CUDAGRAPH_PAD_MULTIPLE", 1)
    if case == "all-warmed":
        info = T.plan(params, session_hours=None)
        assert info["cudagraphs_requested"] and not info["cudagraphs"] and "new_batch_shapes" not in info
        assert "train.cudagraphs: not used here" in T.format_plan(info)
    cap = {"all-warmed": 64, "capped": 3, "one-shape": 1}[case]
    monkeypatch.setattr(planning, "PROBE_MAX_SHAPES", cap)
    if case == "one-shape":   # e.g. epoch 0 of one length, later epochs of others
        monkeypatch.setattr(planning, "probe_slots", lambda *a, **k: [0] * planning.PROBE_DISTINCT_BATCHES)
    monkeypatch.setattr(planning, "PROBE_MAX_WARMUP", cap + 4)
    monkeypatch.setattr(planning, "_cudagraphs_used", lambda session: True)
    _slow_start(monkeypatch, {1: 1.0, 2: 0.6, 3: 0.6})
    info = T.plan(params, session_hours=None)
    probe, run, new = info["batch_shapes_probe"], info["batch_shapes_run"], info["new_batch_shapes"]
    text = T.format_plan(info)
    assert "CUDA graphs: language layers replayed per batch shape" in text and f"{run} in the run" in text
    assert run > 3 and new == run - probe
    if case == "all-warmed":   # every shape of this run is in epoch 0
        assert probe == run and new == 0 and info["new_shapes_s"] == 0.0
        assert info["eta_s"] == pytest.approx(info["steady_s"] + info["probe_warmup_extra_s"])
        assert info["probe_warmup_micro_batches"] >= run and "new batch shapes" not in text
        return
    assert probe == cap
    if case == "one-shape":
        assert info["new_shape_s_each"] is None and info["new_shapes_s"] is None
        assert info["eta_s"] == pytest.approx(info["steady_s"] + info["probe_warmup_extra_s"])
        assert "1 shape warmed by the probe" in text and "its cost was not measured" in text
        return
    assert info["new_shape_s_each"] > 1.0 / (probe - 1)
    assert info["new_shapes_s"] == pytest.approx(new * info["new_shape_s_each"])
    assert info["eta_s"] == pytest.approx(info["steady_s"] + info["probe_warmup_extra_s"] + info["new_shapes_s"])
    assert f"+ {new} new batch shapes ×" in text


def test_plan_suggests_cudagraphs_for_a_compiled_run_at_a_small_micro_batch(monkeypatch):
    """The tip names the overrides that turn train.cudagraphs on (and what it needs: grouped grids; validation
    during training stays on), also under DDP; none when uncompiled (CPU, T4), at large micro-batches or when on."""
    def session(micro=8, world=1, cudagraphs=False, group=False):
        t = SimpleNamespace(micro_batch_size=micro, cudagraphs=cudagraphs, group_by_grid=group)
        return SimpleNamespace(params=SimpleNamespace(train=t), world=world, eval_enabled=True)

    compiled = {"on": True}
    monkeypatch.setattr(planning, "_compiled", lambda s: compiled["on"])
    tip = planning.cudagraphs_tip(session())
    assert "train.cudagraphs=true train.group_by_grid=true replays" in tip and "micro-batch 8" in tip
    assert "eval_every" not in tip
    assert "train.cudagraphs=true replays" in planning.cudagraphs_tip(session(16, group=True))
    assert "2-GPU DDP" in planning.cudagraphs_tip(session(world=2))
    for s in (session(32), session(cudagraphs=True)):
        assert planning.cudagraphs_tip(s) is None
    compiled["on"] = False
    assert planning.cudagraphs_tip(session()) is None

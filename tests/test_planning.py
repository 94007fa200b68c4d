"""The plan's probe (train/planning.py) times steps only after warm-up: a slow first micro-batch (what
torch.compile and CUDA-graph capture cause on a GPU; faked here on the CPU) and a slow first optimizer
step are left out of the steady step time, reported as ``probe_warmup_s`` and counted once in the ETA."""
from __future__ import annotations

import time

import numpy as np
import pytest

from jpcap_helpers import train as T
from jpcap_helpers.train import planning
from tests.test_train import make_params, project  # noqa: F401  (fixture)

SLOW = {1: 1.5, 2: 0.8}     # the first micro-batches: compile, then the dynamic-shape recompile


def _slow_start(monkeypatch, slow: dict[int, float], opt_slow: float = 0.0) -> dict:
    calls = {"micro": 0, "opt": 0}
    real_fb, real_opt = planning.forward_backward, planning._time_optimizer_step

    def forward_backward(session, micro, n_tokens):
        calls["micro"] += 1
        time.sleep(slow.get(calls["micro"], 0.0))
        return real_fb(session, micro, n_tokens)

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
    info = T.plan(params, session_hours=None)
    # no slow start: every distinct probe batch once, then stop as soon as two agree
    assert planning.PROBE_DISTINCT_BATCHES <= info["probe_warmup_micro_batches"] < planning.PROBE_MAX_WARMUP


def test_probe_slots_meet_other_grids_when_grouped():
    a, b, c = (16, 12), (12, 16), (14, 14)
    # grouped by grid: micro-batches 0-2 of grid a, 3 mixes a and b, 4 is b, 5 is c
    grids = np.array([a] * 12 + [a, b, b, b] + [b] * 4 + [c] * 4)
    assert planning.probe_slots(len(grids), 4, grids) == [0, 3, 5]     # the first of a, then new grids
    assert planning.probe_slots(len(grids), 4, None) == [0, 1, 2]      # not grouped: the first three
    assert planning.probe_slots(len(grids), 4, grids, scan=3) == [0, 1, 2]   # none new within the scan
    assert planning.probe_slots(len(grids), 4, np.array([a] * 24)) == [0, 1, 2]   # one grid
    assert planning.probe_slots(6, 4, np.array([a] * 3 + [b] * 3)) == [0, 1, 0]  # two slots: cycled

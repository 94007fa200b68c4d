"""Training micro-batches grouped by visual grid (``train.group_by_grid``, train/grouping.py): the order
is a permutation of the epoch's samples that moves them only within their window, a function of seed,
epoch and grids, it lowers the number of grids per micro-batch, and a kill + resume follows the
uninterrupted run's loss curve (also when an image file went missing in between)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jpcap_helpers import models
from jpcap_helpers import train as T
from jpcap_helpers.params import Params, ParamsError
from jpcap_helpers.train.grouping import MISSING_GRID, group_window, grouped_order, pair_grids, sample_grids
from tests.test_train import RESUME_KW, Killed, kill_at, make_params, project  # noqa: F401  (fixture)

GRIDS = np.array([(84, 112), (112, 84), (112, 112), (56, 196), (196, 56)])


def _random_keys(n: int, seed: int = 0) -> np.ndarray:
    return GRIDS[np.random.default_rng(seed).integers(0, len(GRIDS), n)]


def _grids_per_micro(order: np.ndarray, keys: np.ndarray, micro: int, n_steps: int, effective: int) -> float:
    used = order[:n_steps * effective]
    return float(np.mean([len({tuple(keys[i]) for i in used[j:j + micro]}) for j in range(0, len(used), micro)]))


@pytest.mark.parametrize("n, micro, effective", [(1000, 4, 8), (203, 8, 16), (37, 2, 2), (640, 16, 64)])
def test_grouped_order_is_a_permutation_within_windows(n, micro, effective):
    keys = _random_keys(n)
    window = group_window(effective, micro)
    assert window % effective == 0 and window >= micro
    for epoch in range(3):
        order = T.epoch_order(n, 7, epoch)
        grouped = grouped_order(order, keys, micro, window, 7, epoch)
        assert sorted(grouped.tolist()) == list(range(n))               # every sample once per epoch
        for start in range(0, n, window):                                # ... and within its own window
            assert set(grouped[start:start + window]) == set(order[start:start + window])
        assert np.array_equal(grouped, grouped_order(order, keys, micro, window, 7, epoch))   # deterministic
        assert not np.array_equal(grouped, grouped_order(order, keys, micro, window, 7, epoch + 1))


def test_grouping_lowers_the_grids_per_micro_batch():
    n, micro, effective = 2000, 8, 16
    keys = _random_keys(n, 1)
    order = T.epoch_order(n, 0, 0)
    grouped = grouped_order(order, keys, micro, group_window(effective, micro), 0, 0)
    steps = n // effective
    plain, tight = (_grids_per_micro(o, keys, micro, steps, effective) for o in (order, grouped))
    assert plain > 3.5 and tight < 1.2, (plain, tight)
    # micro-batches are not simply sorted through the window: their order is shuffled
    first = [tuple(keys[i]) for i in grouped[:group_window(effective, micro):micro]]
    assert first != sorted(first)


def test_sample_grids_of_packed_samples_are_their_images():
    grids = np.array([(1, 1), (1, 1), (2, 2), (2, 2), (2, 2), (3, 3)])
    assert np.array_equal(sample_grids(grids), grids)
    assert sample_grids(grids, [[0, 1], [2, 3, 4], [5]]).tolist() == [[1, 1], [2, 2], [3, 3]]


def test_pair_grids_read_the_headers_as_the_processor_resizes(project):  # noqa: F811
    params = make_params(project, "grids")
    _, processor, _ = models.load_model(params, for_training=True)
    pairs, _ = T.read_pairs(params)
    pairs = pairs[:40] + [{**pairs[0], "file_name": "train2014/not-there.png"}]
    grids = pair_grids(pairs, params.images_dir, processor)
    assert grids.shape == (41, 2) and tuple(grids[-1]) == MISSING_GRID
    assert len({tuple(g) for g in grids[:-1]}) >= 2 and (grids[:-1] % 28 == 0).all()
    by_image = {}
    for p, g in zip(pairs[:-1], grids[:-1]):
        assert by_image.setdefault(p["image_id"], tuple(g)) == tuple(g)   # one grid per image


def test_group_by_grid_is_a_checked_param():
    assert Params().train.group_by_grid is False
    assert Params.from_dict({"train": {"group_by_grid": True}}, check_paths=False).train.group_by_grid is True
    with pytest.raises(ParamsError, match="train.group_by_grid: expected bool"):
        Params.from_dict({"train": {"group_by_grid": "yes"}}, check_paths=False)


# ---- the trainer: grouped micro-batches, kill and resume ------------------------------------

GROUPED_KW = {**RESUME_KW, "group_by_grid": True}


@pytest.fixture(scope="module")
def grouped_run(project):  # noqa: F811
    """The reference: 6 grouped steps without a kill, the images in a folder of their own."""
    params = make_params(project, "grouped", **GROUPED_KW)
    return params, T.train(params, resume=False)


def test_grouped_training_batches_hold_fewer_grids(project, grouped_run):  # noqa: F811
    params, ref = grouped_run
    ckpt = T.list_checkpoints(params.run_dir)[-1][1]
    order, grids = np.load(ckpt / "epoch_order.npy"), np.load(ckpt / "pair_grids.npy").reshape(-1, 2)
    pairs, _ = T.read_pairs(params)
    assert len(grids) == len(pairs) and sorted(order.tolist()) == list(range(len(pairs)))
    micro, effective = params.train.micro_batch_size, params.train.effective_batch_size
    steps = len(pairs) // effective
    plain = _grids_per_micro(T.epoch_order(len(pairs), params.run.seed, 0), grids, micro, steps, effective)
    assert _grids_per_micro(order, grids, micro, steps, effective) < plain
    plain_run = T.train(make_params(project, "not-grouped", **{**RESUME_KW, "max_steps": 1}), resume=False)
    assert plain_run.losses[1] != pytest.approx(ref.losses[1], abs=1e-6), "grouping changes what step 1 draws"


def test_grouped_resume_follows_the_same_loss_curve_without_the_image_files(project, grouped_run, tmp_path):  # noqa: F811
    ref_params, ref = grouped_run
    params = make_params(project, "grouped-killed", **GROUPED_KW)
    images = tmp_path / "images"
    shutil.copytree(project["root"], images)
    params.data.images_dir = str(images)
    with pytest.raises(Killed):
        T.train(params, resume=False, callbacks=[kill_at(3)])
    ckpt = T.list_checkpoints(params.run_dir)[-1][1]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and (ckpt / "pair_grids.npy").is_file()
    # an image that steps 3-6 do not draw goes missing: the order must not move (the grids are saved)
    pairs, _ = T.read_pairs(params)
    order, e = np.load(ckpt / "epoch_order.npy"), params.train.effective_batch_size
    drawn = {pairs[i]["file_name"] for i in order[:6 * e]}
    window = order[:group_window(e, params.train.micro_batch_size)]
    gone = next(pairs[i]["file_name"] for i in window if pairs[i]["file_name"] not in drawn)
    (images / gone).unlink()
    with pytest.warns(UserWarning, match="missing"):
        resumed = T.train(params)
    assert resumed.resumed_from_step == 2 and sorted(resumed.losses) == [3, 4, 5, 6]
    for step in range(3, 7):
        assert resumed.losses[step] == pytest.approx(ref.losses[step], abs=1e-5), step
    # changing group_by_grid between a kill and a resume is refused (it changes the order)
    other = make_params(project, "grouped-killed", **RESUME_KW)
    other.data.images_dir = str(images)
    with pytest.raises(T.TrainError, match="other params"):
        T.train(other)


def test_packed_samples_are_grouped_by_their_images_grid(project):  # noqa: F811
    from jpcap_helpers.train.session import open_session

    params = make_params(project, "grouped-packed", pack_captions=True, captions_per_image=2,
                         micro_batch_size=2, effective_batch_size=4, group_by_grid=True)
    session = open_session(params)
    try:
        n = session.data.n_samples
        for epoch in (0, 1):
            order, keys = session.sample_order(epoch), session.data.epoch_grids(epoch)
            assert sorted(order.tolist()) == list(range(n)) and len(keys) == n
            samples = session.data.packed.for_epoch(epoch)
            pairs = session.data.pairs
            for i in order[:20]:   # a packed sample's grid is its image's
                assert tuple(keys[i]) == tuple(session.data.grids[samples[i][0]])
                assert len({pairs[j]["image_id"] for j in samples[i]}) == 1
            steps = n // 4
            plain = _grids_per_micro(T.epoch_order(n, params.run.seed, epoch), keys, 2, steps, 4)
            assert _grids_per_micro(order, keys, 2, steps, 4) < plain
    finally:
        session.close()

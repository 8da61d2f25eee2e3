"""Neighbour batches (batch_grouping.py): the greedy grouping, the sampler's order (whole groups per process and
per batch, a permutation, resumable), and the refusals. The entry point's resume with them is in
test_pretraining.py, two processes in test_distributed.py."""
import argparse

import numpy as np
import pytest

import batch_grouping
import engine_for_pretraining
import utils


def _clusters(sizes: list[int], dims: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around one random centre per cluster (label per row), rows shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dims))
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
    rng.shuffle(labels)
    feats = centres[labels] + 0.05 * rng.normal(size=(len(labels), dims))
    return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32), labels


def test_groups_are_the_clusters_and_cover_every_row_once():
    feats, labels = _clusters([4, 4, 4, 4])
    groups = batch_grouping.neighbour_groups(feats, 4, np.random.default_rng(1))
    assert sorted(i for g in groups for i in g) == list(range(16))
    assert all(len(set(labels[g])) == 1 for g in groups)


def test_rows_left_over_form_a_last_smaller_group():
    feats, _ = _clusters([3, 4])
    groups = batch_grouping.neighbour_groups(feats, 3, np.random.default_rng(0))
    assert [len(g) for g in groups] == [3, 3, 1]
    assert sorted(i for g in groups for i in g) == list(range(7))


def _sampler(n: int, group: int, world: int, rank: int, feats: np.ndarray | None, pool: int = 4096):
    s = batch_grouping.NeighbourBatchSampler(list(range(n)), group, num_replicas=world, rank=rank, seed=2,
                                             pool=pool)
    s.set_epoch(3)
    s.set_features(feats)
    return s


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_process_receives_whole_groups_and_processes_share_nothing(world):
    feats, labels = _clusters([4] * 12)
    seen = []
    for rank in range(world):
        mine = list(_sampler(48, 4, world, rank, feats))
        assert len(mine) % 4 == 0
        for start in range(0, len(mine), 4):  # batches of 8 = 2 groups each: a group never straddles a batch
            assert len(set(labels[mine[start:start + 4]])) == 1
        seen += mine
    assert len(seen) == len(set(seen)) == 48 // world * world


def test_the_order_is_a_permutation_that_changes_with_the_epoch_and_resumes_from_any_prefix():
    feats, _ = _clusters([4] * 10, seed=3)
    s = _sampler(40, 4, 2, 1, feats)
    order, full = s.epoch_order(), list(s)
    assert sorted(order) == list(range(40))
    resumed = _sampler(40, 4, 2, 1, feats)
    resumed.set_start(16)  # 16 samples of all processes seen: 2 batches of 4 per process
    assert list(resumed) == full[8:]
    other = _sampler(40, 4, 2, 1, feats)
    other.set_epoch(4)
    other.set_features(feats)
    assert other.epoch_order() != order


def test_a_saved_order_is_used_as_given_and_a_new_epoch_forgets_it():
    feats, _ = _clusters([4] * 4)
    s = _sampler(16, 4, 1, 0, feats)
    saved = s.epoch_order()
    other = _sampler(16, 4, 1, 0, None)
    other.set_order(saved)
    assert list(other) == saved
    other.set_epoch(4)  # no features set for the new epoch: the uniform order of the parent sampler
    plain = utils.ResumableDistributedSampler(list(range(16)), num_replicas=1, rank=0, seed=2)
    plain.set_epoch(4)
    assert list(other) == list(plain)


def test_refusals_name_what_is_wrong():
    with pytest.raises(ValueError, match="at least 2 clips"):
        batch_grouping.NeighbourBatchSampler(list(range(8)), 1, num_replicas=1, rank=0, seed=0)
    with pytest.raises(ValueError, match="pool .* smaller than a group"):
        batch_grouping.NeighbourBatchSampler(list(range(8)), 4, num_replicas=1, rank=0, seed=0, pool=2)
    s = _sampler(8, 2, 1, 0, None)
    with pytest.raises(ValueError, match="5 feature rows for 8"):
        s.set_features(np.zeros((5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="permutation of the 8"):
        s.set_order([0, 1, 2, 3, 4, 5, 6, 6])


def test_pools_group_within_themselves():
    """With a pool smaller than the list, each group's members come from one pool of the epoch's permutation."""
    feats, labels = _clusters([4] * 8, seed=5)
    s = _sampler(32, 4, 1, 0, feats, pool=16)
    rng = np.random.default_rng([s.seed, s.epoch, 0x6e6262])
    pools = rng.permutation(32).reshape(2, 16)
    pool_of = {int(i): k for k, row in enumerate(pools) for i in row}
    for g in s.epoch_groups():
        assert len({pool_of[i] for i in g}) == 1


def test_the_entry_points_sampler_follows_the_flag_and_refuses_groups_that_split_a_step():
    def args(**kw):
        return argparse.Namespace(**{"caption_group_size": 1, "caption_group_pool": 64, "clips_per_video": 1,
                                     "world_size": 1, "rank": 0, "seed": 0, **kw})
    data = list(range(16))
    assert type(engine_for_pretraining.build_sampler(args(), data, 8)) is utils.ResumableDistributedSampler
    grouped = engine_for_pretraining.build_sampler(args(caption_group_size=4), data, 8)
    assert isinstance(grouped, batch_grouping.NeighbourBatchSampler) and grouped.group_size == 4
    with pytest.raises(ValueError, match="--caption_group_size 3 does not divide the batch size 8"):
        engine_for_pretraining.build_sampler(args(caption_group_size=3), data, 8)
    with pytest.raises(ValueError, match="cannot be combined with --clips_per_video"):
        engine_for_pretraining.build_sampler(args(caption_group_size=2, clips_per_video=2), data, 4)

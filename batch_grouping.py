"""Neighbour batches: a training sampler whose batches are made of small groups of clips whose captions the model
currently embeds close together, so that every clip meets a few in-batch negatives that differ from it in a detail.

With uniformly random batches, in-batch negatives are easy: on the synthetic set, only 19% of the clips of a batch
of 16 share the object's colour and the background with another clip of the batch, so the contrastive loss never
asks for the object's shape or its motion, and the matching head's hard negatives (drawn from the batch) differ in
what the features already separate. Grouping neighbours makes the confused details the ones to learn (retrieval
work builds batches from clusters for the same reason). Off by default (--caption_group_size 1): the papers
sample uniformly.

Neighbours are found within pools of `pool` clips of the epoch's random permutation (greedily: a random seed clip
and its nearest free clips), so an epoch costs O(len x pool) similarity products and the groups change from epoch
to epoch.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

import distributed
import retrieval_eval
import utils


def neighbour_groups(features: np.ndarray, group_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Rows of `features` in groups of `group_size` (>= 2): a random unassigned seed and its most similar unassigned
    rows, until fewer than `group_size` rows are left (those are returned as a last, smaller group)."""
    n = len(features)
    similarity = features @ features.T
    free = np.ones(n, dtype=bool)
    groups: list[list[int]] = []
    for seed in rng.permutation(n):
        if not free[seed]:
            continue
        free[seed] = False
        if free.sum() < group_size - 1:
            groups.append([int(seed), *np.flatnonzero(free).tolist()])
            free[:] = False
            break
        scores = np.where(free, similarity[seed], -np.inf)
        nearest = np.argpartition(-scores, group_size - 2)[:group_size - 1]
        free[nearest] = False
        groups.append([int(seed), *map(int, nearest)])
    return groups


class NeighbourBatchSampler(utils.ResumableDistributedSampler):
    """ResumableDistributedSampler whose epoch order is made of neighbour groups under features given for the
    epoch (set_features), dealt so that each process receives whole groups: a batch of B clips holds B / group_size
    groups, the groups in random order. Without features (set_features(None)) the order is the parent's uniform one.
    Resuming (set_start) skips a prefix of the same order, as the parent does, provided the same features are set."""

    def __init__(self, dataset: torch.utils.data.Dataset, group_size: int, num_replicas: int, rank: int, seed: int,
                 pool: int = 4096) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed, shuffle=True, drop_last=True)
        if group_size < 2:
            raise ValueError(f"a neighbour group needs at least 2 clips, got {group_size}")
        if pool < group_size:
            raise ValueError(f"the neighbour pool ({pool}) is smaller than a group ({group_size})")
        self.group_size, self.pool = int(group_size), int(pool)
        self.features: np.ndarray | None = None
        self.order: list[int] | None = None  # this epoch's, once computed (or restored on resume)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.features, self.order = None, None

    def set_features(self, features: np.ndarray | None) -> None:
        """[len(dataset), D] unit vectors (identical in every process) that define this epoch's neighbours."""
        if features is not None and len(features) != len(self.dataset):
            raise ValueError(f"{len(features)} feature rows for {len(self.dataset)} dataset items")
        self.features = None if features is None else np.asarray(features, dtype=np.float32)
        self.order = None

    def set_order(self, order: Sequence[int]) -> None:
        """Use a saved epoch order (a resumed run continues the order the interrupted one had drawn)."""
        if sorted(order) != list(range(len(self.dataset))):
            raise ValueError(f"a saved batch order must be a permutation of the {len(self.dataset)} dataset items")
        self.order = [int(i) for i in order]

    def epoch_groups(self) -> list[list[int]]:
        """This epoch's groups of dataset indices (the same in every process: seeded by seed + epoch)."""
        rng = np.random.default_rng([self.seed, self.epoch, 0x6e6262])
        order = rng.permutation(len(self.dataset))
        groups: list[list[int]] = []
        leftovers: list[int] = []
        for start in range(0, len(order), self.pool):
            members = order[start:start + self.pool]
            for g in neighbour_groups(self.features[members], self.group_size, rng):
                if len(g) == self.group_size:
                    groups.append([int(members[j]) for j in g])
                else:
                    leftovers.extend(int(members[j]) for j in g)
        groups = [groups[i] for i in rng.permutation(len(groups))]
        tail = [leftovers[i:i + self.group_size] for i in range(0, len(leftovers), self.group_size)]
        return groups + tail  # leftovers last: a short group cannot shift the later groups off batch boundaries

    def epoch_order(self) -> list[int]:
        """The whole epoch's order (all processes together), as the parent deals it out."""
        return self._epoch_order()

    def _epoch_order(self) -> list[int]:
        """Group k goes to process k mod world size; the processes' sequences are interleaved so that the parent's
        round-robin dealing (order[rank::world]) gives each process its own groups back, in order."""
        if self.order is not None:
            return self.order
        if self.features is None:
            return super()._epoch_order()
        per_rank: list[list[int]] = [[] for _ in range(self.num_replicas)]
        for k, group in enumerate(self.epoch_groups()):
            per_rank[k % self.num_replicas].extend(group)
        longest = max(len(s) for s in per_rank)
        order: list[int] = []
        for j in range(longest):
            order.extend(s[j] for s in per_rank if j < len(s))
        self.order = order
        return order


class TextNeighbourGrouping:
    """Before each epoch: the model's own text embedding of every training clip's first caption defines its
    neighbours (the features are what the contrastive loss currently confuses), and the sampler groups the epoch's
    batches by them. Every process embeds its share and the embeddings are gathered, so all processes group the
    same way. The epoch's order goes into the checkpoints (TrainState.batch_order): a run resumed inside the epoch
    continues that order (the resumed weights would group differently, and the skipped prefix would no longer be
    the clips already seen)."""

    def __init__(self, sampler: NeighbourBatchSampler, model: torch.nn.Module,
                 captions_of: Callable[[int], Sequence[str]], tokenizer, cfg: retrieval_eval.EvalConfig,
                 batch_size: int = 256) -> None:
        self.sampler, self.model, self.captions_of, self.tokenizer = sampler, model, captions_of, tokenizer
        self.cfg, self.batch_size = cfg, int(batch_size)

    def __call__(self, epoch: int, saved_order: torch.Tensor | None) -> torch.Tensor:
        """Set epoch `epoch`'s order (the saved one when resuming inside it); returns it, for the checkpoints."""
        if saved_order is not None:
            self.sampler.set_order(saved_order.tolist())
            print(f"Batches of epoch {epoch}: the neighbour groups saved in the checkpoint")
            return saved_order
        started = time.time()
        self.sampler.set_features(self.embed())
        order = torch.tensor(self.sampler.epoch_order(), dtype=torch.int64)
        print(f"Batches of epoch {epoch}: groups of {self.sampler.group_size} clips with the nearest text "
              f"embeddings ({len(order)} clips embedded and grouped in {time.time() - started:.1f} s)")
        return order

    @torch.no_grad()
    def embed(self) -> np.ndarray:
        """[len(dataset), D] normalised text embeddings, in dataset order, the same in every process."""
        world, rank, n = distributed.get_world_size(), distributed.get_rank(), len(self.sampler.dataset)
        share = -(-n // world)  # contiguous shares: the gathered rows are already in dataset order
        mine = range(rank * share, min(n, (rank + 1) * share))
        was_training = self.model.training
        self.model.eval()
        try:
            feats = retrieval_eval.encode_texts(self.model, self.tokenizer, [self.captions_of(i)[0] for i in mine],
                                                self.cfg, batch_size=self.batch_size)
        finally:
            self.model.train(was_training)
        return distributed.gather_rows(feats.to(self.cfg.device).float()).cpu().numpy()

"""Training batches that a resumed run draws exactly as the uninterrupted run would.

:class:`EpochSeededSampler` makes an epoch's item order and each item's seed (its patch position and
augmentation draws) a function of ``(run seed, epoch)`` alone, never of how many batches were drawn before
in this process. :class:`ResumableDataLoader` counts the batches it hands out and gives Lightning its
position (``state_dict``: epoch and batches done in it), which Lightning stores in the resume checkpoint
and hands back on resume (``load_state_dict``); the next epoch then starts at that batch. A run killed
after step k and resumed therefore trains on the same batches, with the same augmentation, as one that was
never interrupted (tests/test_reliability2.py compares their weights).

The batches do not depend on ``num_workers`` either: the order and the item seeds are drawn here, in the
training process.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

from monai.data import DataLoader

MAX_ITEM_SEED = 2**31 - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch's draws, mixed from the run seed and the epoch (``numpy.SeedSequence``:
    neighbouring seeds and epochs give unrelated streams)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


class EpochSeededSampler(Sampler):
    """``(index, item seed)`` pairs: a permutation of the ``n`` items per epoch (``replacement=False``, as
    ``shuffle=True``) or ``num_samples`` uniform draws with replacement, plus a seed per item for its
    randomness. ``epoch`` and ``skip`` (items already used in it) are set by :class:`ResumableDataLoader`."""

    def __init__(self, n: int, seed: int, *, replacement: bool = False, num_samples: Optional[int] = None):
        if replacement is False and num_samples not in (None, n):
            raise ValueError("num_samples other than n needs replacement=True")
        self.n = n
        self.seed = seed
        self.replacement = replacement
        self.num_samples = n if num_samples is None else num_samples
        self.epoch = 0
        self.skip = 0

    def __len__(self) -> int:
        return self.num_samples

    def epoch_items(self, epoch: int) -> list[tuple[int, int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        if self.replacement:
            order = torch.randint(0, self.n, (self.num_samples,), generator=generator)
        else:
            order = torch.randperm(self.n, generator=generator)
        seeds = torch.randint(0, MAX_ITEM_SEED, (self.num_samples,), generator=generator)
        return list(zip(order.tolist(), seeds.tolist()))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.epoch_items(self.epoch)[self.skip:])


class ResumableDataLoader(DataLoader):
    """MONAI's DataLoader over an :class:`EpochSeededSampler` that knows where it is: ``state_dict()`` is
    ``{"epoch", "batches"}`` (batches handed out in that epoch), which Lightning saves in its checkpoints
    and restores on resume (a loader with this interface is "stateful" to Lightning)."""

    def __init__(self, dataset, sampler: EpochSeededSampler, batch_size: int, **kwargs: Any):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **kwargs)
        self.epoch = 0
        self.batches_done = 0

    def __iter__(self):
        epoch, done, n_batches = self.epoch, self.batches_done, len(self)
        self.sampler.epoch, self.sampler.skip = epoch, done * self.batch_size
        for batch in super().__iter__():
            done += 1
            # counted when handed out: a checkpoint written while this batch trains resumes after it
            self.epoch, self.batches_done = (epoch + 1, 0) if done >= n_batches else (epoch, done)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["batches"])
        self.epoch, self.batches_done = (epoch + 1, 0) if done >= len(self) else (epoch, done)

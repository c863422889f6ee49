"""The data order of a run: every global batch is a pure function of (seed, position), cut the same way for any
number of processes, and every sample gets a global id that keys its random draws (:mod:`lorakit.rng`)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from lorakit.rng import mix_seed


class GlobalBatchSampler:
    """Batch sampler that gives this process its slice of every global batch.

    Each epoch shuffles every group (bucket) with a generator seeded by (seed, epoch), pads it to a multiple of
    the global batch by cycling, cuts global batches of ``batch_size * num_processes``, and shuffles their order.
    Process ``p`` takes positions ``[p*b, (p+1)*b)`` of each global batch, so 1 process x 2b and 2 processes x b
    see the same global batches. Yields lists of ``(dataset index, sample id)``; the sample id of position ``j``
    of micro-batch ``m`` is ``m * global_batch + j``. ``start`` = micro-batches already consumed (resume).
    """

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, num_processes: int = 1,
                 process_index: int = 0, seed: int = 0, start: int = 0):
        self.groups = [list(g) for g in groups if len(g)]
        if not self.groups:
            raise ValueError("the dataset is empty: nothing to sample")
        if batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {batch_size}")
        self.b, self.world, self.rank = batch_size, num_processes, process_index
        self.global_batch = batch_size * num_processes
        self.seed, self.start = seed, start
        self.batches_per_epoch = sum(math.ceil(len(g) / self.global_batch) for g in self.groups)
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (dataset indices) of one epoch, in order."""
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 7))
        batches = []
        for group in self.groups:
            perm = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
            n = math.ceil(len(perm) / self.global_batch) * self.global_batch
            padded = (perm * math.ceil(n / len(perm)))[:n]
            batches += [padded[i : i + self.global_batch] for i in range(0, n, self.global_batch)]
        order = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in order]
        self._cache = (epoch, batches)
        return batches

    def __iter__(self):
        m = self.start
        while True:
            epoch, k = divmod(m, self.batches_per_epoch)
            share = self.epoch_batches(epoch)[k][self.rank * self.b : (self.rank + 1) * self.b]
            base = m * self.global_batch + self.rank * self.b
            yield [(idx, base + j) for j, idx in enumerate(share)]
            m += 1


class KeyedDataset(torch.utils.data.Dataset):
    """Calls ``get_item(i, sample_id)`` (or ``[i]``) and adds ``sample_id`` to the item."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.keyed = hasattr(dataset, "get_item")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, sample_id = key
        item = self.dataset.get_item(index, sample_id) if self.keyed else self.dataset[index]
        item = dict(item)
        item["sample_id"] = sample_id
        return item

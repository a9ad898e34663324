"""The deterministic batch plan.

The sample order of an epoch is a pure function of ``(seed, epoch)``; step
``t``'s micro-batches are fixed slices of that order, so any step's batch can
be rebuilt from the ids alone (resume, replay, reconstruction, and the
unlearning counterfactual, which drops ids but keeps every other position).
Micro-batches are listed micro-step major, rank minor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    batch_size: int
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    seed: int = 42

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # Incomplete global batches are dropped (seen again next epoch in another order).
        return max(1, self.num_samples // self.global_batch) if self.num_samples >= self.global_batch else 1

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def locate(self, step: int) -> tuple[int, int]:
        """Global step -> (epoch, step within epoch)."""
        return divmod(step, self.steps_per_epoch)

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, k = self.locate(step)
        order = self.epoch_order(epoch)
        start = k * self.global_batch
        n_micro = self.gradient_accumulation_steps * self.world_size
        return [order[start + j * self.batch_size: start + (j + 1) * self.batch_size] for j in range(n_micro)]

    def rank_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        mbs = self.micro_batches(step)
        return mbs[rank:: self.world_size]

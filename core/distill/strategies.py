"""Where each optimizer step's responses come from.

- `off_policy`: the dataset's responses.
- `on_policy`: responses the student samples for the batch's prompts.
- `adaptive` (DistiLLM's adaptive off-policy schedule, used by AMiD): a threshold θ (start 0) and a replay
  buffer. Each step draws u ~ U(0, 1): if u < θ·(1 − step/total), or u < θ while the buffer is not full,
  the student generates (and the samples go into the buffer); else if u < θ the step replays a batch from
  the buffer; else it uses the dataset. θ rises by `threshold_increment` after an evaluation whose
  validation loss rose by more than `loss_rise_tolerance` over the previous one.

All randomness here comes from generators whose state is saved in checkpoints, so a resumed run draws
exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Any

import torch

from core.distill.data import Example
from core.distill.spec import StrategySpec


class Source(str, Enum):
    DATASET = "dataset"
    STUDENT = "student"
    REPLAY = "replay"


class DataOrder:
    """An endless stream of dataset indices: a fresh seeded permutation per epoch."""

    def __init__(self, size: int, *, seed: int):
        if size < 1:
            raise ValueError("the training data holds no usable example")
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._permutation = self._make_permutation()

    def _make_permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        """The next `count` indices, running into the next epoch when this one ends."""
        out = []
        for _ in range(count):
            if self.index >= self.size:
                self.epoch += 1
                self.index = 0
                self._permutation = self._make_permutation()
            out.append(self._permutation[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._permutation = self._make_permutation()


class ReplayBuffer:
    """The newest `capacity` student-generated examples."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: deque[Example] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def add(self, examples: list[Example]) -> None:
        self._items.extend(examples)

    def sample(self, count: int, generator: torch.Generator) -> list[Example]:
        """`count` examples drawn uniformly with replacement."""
        picks = torch.randint(len(self._items), (count,), generator=generator).tolist()
        return [self._items[i] for i in picks]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "items": [_example_state(e) for e in self._items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._items = deque((Example(**item) for item in state["items"]), maxlen=self.capacity)


def _example_state(example: Example) -> dict[str, Any]:
    return {name: getattr(example, name) for name in example.__dataclass_fields__}


class DataStrategy:
    """Decides each step's data source and keeps θ and the replay buffer."""

    def __init__(self, spec: StrategySpec, *, total_steps: int, seed: int):
        self.spec = spec
        self.total_steps = total_steps
        self.theta = 0.0
        self.previous_eval_loss: float | None = None
        self.buffer = ReplayBuffer(spec.replay_capacity)
        self.generator = torch.Generator().manual_seed(seed + 7919)

    def choose(self, step: int) -> Source:
        """The source for optimizer step `step` (1-based)."""
        if self.spec.name == "off_policy":
            return Source.DATASET
        if self.spec.name == "on_policy":
            return Source.STUDENT
        u = float(torch.rand((), generator=self.generator))
        decayed = self.theta * (1.0 - (step - 1) / self.total_steps)
        if u < decayed or (u < self.theta and not self.buffer.full):
            return Source.STUDENT
        if u < self.theta and len(self.buffer) > 0:
            return Source.REPLAY
        return Source.DATASET

    def after_eval(self, eval_loss: float) -> bool:
        """Record a validation loss; returns True when it rose enough to raise θ (adaptive only)."""
        rose = (
            self.previous_eval_loss is not None
            and eval_loss > self.previous_eval_loss + self.spec.loss_rise_tolerance
        )
        self.previous_eval_loss = eval_loss
        if rose and self.spec.name == "adaptive":
            self.theta = min(1.0, self.theta + self.spec.threshold_increment)
            return True
        return False

    def stats(self) -> dict[str, float]:
        if self.spec.name != "adaptive":
            return {}
        return {"theta": self.theta, "replay_size": float(len(self.buffer))}

    def state_dict(self) -> dict[str, Any]:
        return {
            "theta": self.theta,
            "previous_eval_loss": self.previous_eval_loss,
            "buffer": self.buffer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta = float(state["theta"])
        self.previous_eval_loss = state["previous_eval_loss"]
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["generator"])

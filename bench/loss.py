"""Naive vs fused distillation loss, side by side in one process: time and peak memory of forward+backward.

Naive: full logits ``hidden @ W.T`` for both models, then ``distillation_loss``; autograd keeps every
``[tokens, V]`` intermediate for backward. Fused: ``fused_distillation_loss`` on the hidden states.

    .venv/bin/python bench/loss.py            # CPU: 4096 tokens, V 49,152, hidden 576 (SmolLM2 shapes)
    .venv/bin/python bench/loss.py --quick    # a smaller CPU shape, seconds instead of minutes

On CUDA the Qwen2.5 shape (8192 tokens, V 151,936, hidden 896 / 1536, bfloat16) runs as well.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.distill.fused import default_chunk_size, fused_distillation_loss  # noqa: E402
from core.distill.losses import distillation_loss  # noqa: E402

MEMORY_METHOD = {
    "cpu": (
        "peak extra memory = high-water mark of the bytes of tensor storages created by aten ops during "
        "forward+backward and still alive (a TorchDispatchMode registers each new storage and a weakref "
        "finalizer on every tensor using it); inputs are excluded, parameter .grad included. "
        "rss = rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs), "
        "a cross-check that counts only touched pages but also kernel workspaces and freed memory the C "
        "allocator keeps "
        "(glibc serves blocks under 32 MiB from its heap once its mmap threshold has grown)."
    ),
    "cuda": "peak extra memory = torch.cuda.max_memory_allocated() during forward+backward minus the "
    "memory allocated before it (inputs excluded, parameter .grad included).",
}


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    vocab: int
    student_hidden: int
    teacher_hidden: int


CPU_SHAPE = Shape("SmolLM2", 4096, 49_152, 576, 576)
QUICK_SHAPE = Shape("quick", 2048, 16_384, 256, 256)
CUDA_SHAPE = Shape("Qwen2.5-1.5B->0.5B", 8192, 151_936, 896, 1536)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and not yet freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors using it]
        self.current = 0
        self.peak = 0

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            if address == 0:
                continue
            if address in self.live:
                self.live[address][1] += 1
            elif address in inputs:
                continue  # a view of, or in-place op on, memory that existed before: not an allocation
            else:
                self.live[address] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(tensor, self._release, address)
        return out


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size: int, scale: float) -> Tensor:
        return (torch.randn(size, generator=gen) * scale).to(device, dtype)

    # Scales give logits with a standard deviation of about 2, like a trained LM head.
    tensors = {
        "student_hidden": randn(shape.tokens, shape.student_hidden, scale=1.0).requires_grad_(),
        "student_head_weight": randn(shape.vocab, shape.student_hidden, scale=2 / shape.student_hidden**0.5),
        "teacher_hidden": randn(shape.tokens, shape.teacher_hidden, scale=1.0),
        "teacher_head_weight": randn(shape.vocab, shape.teacher_hidden, scale=2 / shape.teacher_hidden**0.5),
    }
    tensors["student_head_weight"].requires_grad_()
    labels = torch.randint(0, shape.vocab, (shape.tokens,), generator=gen)
    labels[: shape.tokens // 8] = -100  # a prompt's worth of masked positions
    tensors["labels"] = labels.to(device)
    return tensors


def naive_step(t: dict[str, Tensor], loss: str, params: dict) -> None:
    logits_s = t["student_hidden"] @ t["student_head_weight"].T
    with torch.no_grad():
        logits_t = t["teacher_hidden"] @ t["teacher_head_weight"].T
    distillation_loss(loss, logits_s, logits_t, t["labels"], **params).backward()


def fused_step(t: dict[str, Tensor], loss: str, params: dict, chunk_size: int | None) -> None:
    fused_distillation_loss(
        t["student_hidden"],
        t["student_head_weight"],
        t["teacher_hidden"],
        t["teacher_head_weight"],
        t["labels"],
        loss=loss,
        chunk_size=chunk_size,
        **params,
    ).backward()


def _clear_grads(t: dict[str, Tensor]) -> None:
    for tensor in t.values():
        tensor.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(step: Callable[[], None], t: dict[str, Tensor], device: torch.device) -> float:
    """Seconds of one forward+backward."""
    _clear_grads(t)
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def measure_memory(step: Callable[[], None], t: dict[str, Tensor], device: torch.device) -> dict[str, int]:
    """Peak extra bytes of one forward+backward (see MEMORY_METHOD)."""
    _clear_grads(t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return {"tensors": torch.cuda.max_memory_allocated(device) - base}
    result = {}
    if _reset_peak_rss():
        base = _peak_rss_bytes()
        step()
        result["rss"] = _peak_rss_bytes() - base
        _clear_grads(t)
    with LiveTensorBytes() as tracker:
        step()
    result["tensors"] = tracker.peak
    return result


def run_shape(shape: Shape, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> None:
    t = _inputs(shape, dtype, device)
    chunk = args.chunk_size or default_chunk_size(shape.vocab, device)
    params = {}
    steps = {
        "naive": lambda: naive_step(t, args.loss, params),
        "fused": lambda: fused_step(t, args.loss, params, chunk),
    }
    for step in steps.values():
        measure_time(step, t, device)  # warm-up: allocator pools, kernels, probes
    memory = {name: measure_memory(step, t, device) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():  # interleaved, so background load hits both alike
            times[name].append(measure_time(step, t, device))
    median = {name: statistics.median(values) for name, values in times.items()}

    print(
        f"\n{shape.name} on {device.type}: {shape.tokens} tokens, V={shape.vocab}, "
        f"hidden {shape.student_hidden}/{shape.teacher_hidden}, {str(dtype).removeprefix('torch.')}, "
        f"loss={args.loss}, chunk={chunk}, median of {args.reps} reps, {torch.get_num_threads()} threads"
    )
    print(f"{'':28}{'naive':>12}{'fused':>12}{'fused/naive':>14}")
    print(
        f"{'time fwd+bwd (ms)':28}{median['naive'] * 1e3:12.1f}{median['fused'] * 1e3:12.1f}"
        f"{median['fused'] / median['naive']:14.3f}"
    )
    for key, label in (("tensors", "peak extra memory (MiB)"), ("rss", "peak extra RSS (MiB)")):
        if key in memory["naive"]:
            naive, fused = memory["naive"][key], memory["fused"][key]
            print(f"{label:28}{naive / 2**20:12.1f}{fused / 2**20:12.1f}{fused / max(naive, 1):14.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="run a small CPU shape only")
    parser.add_argument("--loss", default="amid", help="loss name (default amid)")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: by vocab)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per path (median reported)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU shape")
    args = parser.parse_args()

    print("memory method (cpu):", MEMORY_METHOD["cpu"])
    if not args.no_cpu:
        run_shape(QUICK_SHAPE if args.quick else CPU_SHAPE, torch.device("cpu"), torch.float32, args)
    if torch.cuda.is_available() and not args.quick:
        print("\nmemory method (cuda):", MEMORY_METHOD["cuda"])
        run_shape(CUDA_SHAPE, torch.device("cuda"), torch.bfloat16, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training on several devices: one process per rank, launched by `torch.distributed.run` (torchrun).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m worker.trainer_process ...

`distill train` and the worker launch the ranks; `train()` finds them through torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK) and joins the process group (gloo on CPU, NCCL on CUDA).

What stays exactly as on one device, and how:
- the global batch and the data order: every rank walks the same seeded `DataOrder` and the same strategy
  draws, and takes its equal, contiguous slice of every micro-batch (`Ranks.shard`), so the ranks' slices
  put together are the one-device micro-batch;
- the loss normalization: the step's loss-token count is summed over the ranks before any loss is
  computed, so a rank's loss is its token sum over the GLOBAL count and the sum of the ranks' gradients is
  the one-device gradient. DDP and FSDP average gradients over the ranks, so each rank's loss is scaled by
  the world size before its backward pass (`StudentLoss`; exact for powers of two);
- what is reported: losses and token counts are summed over the ranks; rank 0's evaluation metrics are
  every rank's; only rank 0 calls the trainer callbacks and writes checkpoints and the student;
- stops: rank 0 asks `should_stop` and broadcasts its answer (`Ranks.agree`) after every step, so every
  rank stops at the same step. Inside an evaluation or an on-policy generation the ranks do not stop
  (they would leave it at different points); the stop is honoured right after it.

DDP replicates the student. FSDP2 (`fully_shard`) shards every decoder layer, and the rest of the student
(embeddings, final norm, head) as the root unit: its parameters, gradients and AdamW state live in shards,
and a checkpoint keeps the optimizer's shards with `torch.distributed.checkpoint` (`save_sharded`). The
teacher is replicated on every rank for inference (no gradients, no optimizer state).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.distill.checkpoint import SHARDED_DIR
from core.distill.objective import Objective
from core.distill.spec import ResourcesSpec

T = TypeVar("T")

# Ranks wait for each other at every step and evaluation; a long evaluation on rank 0 must not time out
# the others (the launcher ends every rank when one dies, so this is no hang detector).
_TIMEOUT = timedelta(hours=6)


class LaunchError(RuntimeError):
    """The processes do not match `resources` (a multi-device job run without torchrun, or the reverse)."""


@dataclass
class Ranks:
    """This process' place among the job's ranks; every method is a no-op (or the identity) on one rank.

    Methods that talk to the other ranks are collectives: every rank must call them, in the same order."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reports, checkpoints and saves."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------------------------------ start
    @classmethod
    def start(cls, resources: ResourcesSpec, device: torch.device) -> tuple[Ranks, torch.device]:
        """Join the ranks torchrun started (or stay alone when `resources` asks for one device); returns
        this rank and its device (`cuda:LOCAL_RANK` when `device` is CUDA)."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched == 1 and resources.world_size == 1:
            return cls(), device
        if launched != resources.world_size:
            raise LaunchError(
                f"resources asks for {resources.world_size} ranks (devices × nnodes) but {launched} were "
                "launched: start the job with distill train or the worker, which launch torch.distributed.run"
            )
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=_TIMEOUT)
        return cls(rank, launched, local_rank, resources.strategy, owns), device

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------- the batch
    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of a micro-batch (its size is a multiple of the world size)."""
        size = len(items) // self.world_size
        return list(items[self.rank * size : (self.rank + 1) * size])

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's `items`, in rank order: the inverse of `shard`."""
        if not self.is_distributed:
            return list(items)
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    # ---------------------------------------------------------------------------------- collectives
    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of `values` over the ranks (float64)."""
        if not self.is_distributed:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank (a stop decision)."""
        if not self.is_distributed:
            return flag
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` (any picklable object), on every rank."""
        if not self.is_distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo only CPU ones.
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------- the student
class StudentLoss(nn.Module):
    """The student's losses on one micro-batch as one `forward`.

    The fused loss reads the head's weight outside the student's own forward, so DDP's and FSDP's hooks,
    which run around a module's forward, must wrap this module rather than the student. Returns the loss
    to back-propagate (scaled by `grad_scale`), and the unscaled loss, KD and CE terms."""

    def __init__(self, student: nn.Module, objective: Objective, *, grad_scale: float = 1.0) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.grad_scale = grad_scale

    def forward(
        self,
        teacher: nn.Module,
        targets: Tensor,
        batch: dict[str, Tensor],
        normalizer: float,
        overrides: dict[str, Any],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        terms = self.objective.student_losses(
            self.student, teacher, targets, batch, normalizer=normalizer, **overrides
        )
        return terms.loss * self.grad_scale, terms.loss.detach(), terms.kd.detach(), terms.ce.detach()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes transformers never splits across devices."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def wrap_student(student: nn.Module, objective: Objective, ranks: Ranks, device: torch.device) -> nn.Module:
    """The module a training step calls: `StudentLoss` as is on one rank, under DDP or FSDP2 on several.

    Build the optimizer after this: FSDP replaces the student's parameters by their shards."""
    loss = StudentLoss(student, objective, grad_scale=float(ranks.world_size))
    if not ranks.is_distributed:
        return loss
    if ranks.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(loss, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ranks.world_size,))
    layers = decoder_layers(student)
    if not layers:
        raise LaunchError(
            f"{type(student).__name__} names no decoder layer class to shard (_no_split_modules)"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(loss, mesh=mesh)
    # transformers' generate() then runs in step on every rank (synced_gpus): a rank whose sequences have
    # all ended keeps joining the others' layer all-gathers until every rank is done.
    student._is_fsdp_managed_module = True
    return loss


def is_sharded(trainable: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(trainable, FSDPModule)


@contextlib.contextmanager
def accumulating(trainable: nn.Module, *, last: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: DDP all-reduces the gradients only after the last
    micro-batch of a step (the sum of the accumulated gradients is the same, in fewer messages)."""
    if last or not hasattr(trainable, "no_sync"):
        yield
        return
    with trainable.no_sync():
        yield


@contextlib.contextmanager
def whole_student(trainable: nn.Module) -> Iterator[None]:
    """Around a use of the student outside a training step (evaluation, generation): under FSDP, gathers
    the root unit (embeddings, final norm, head) for the duration; the layers gather themselves."""
    if not is_sharded(trainable):
        yield
        return
    state = trainable._get_fsdp_state()
    state._lazy_init()  # a first use before any training step must still make this module the root
    trainable.unshard()
    try:
        yield
    finally:
        trainable.reshard()


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` (inf: no clipping); returns the total norm over every rank's gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):  # FSDP: a norm over shards, to be summed over the ranks
        total = total.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)


# ------------------------------------------------------------------------------------------ saving
def full_student(trainable: nn.Module, student: nn.Module, ranks: Ranks) -> nn.Module | None:
    """A plain copy of the student to save (rank 0; None on the others). Under FSDP every rank must call
    this: the shards are gathered into a full state dict on rank 0's CPU."""
    if not is_sharded(trainable):
        return student if ranks.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(trainable, options=options)
    if not ranks.is_main:
        return None
    prefix = "student."
    weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    with torch.device("meta"):
        plain = type(student)(student.config)
    plain.load_state_dict(weights, assign=True, strict=False)
    plain.tie_weights()
    plain.generation_config = student.generation_config
    return plain


def optimizer_state(trainable: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state for a checkpoint. Under FSDP (a collective) its tensors are this rank's shards,
    keyed by parameter name: `{"state": {name: {"exp_avg": ..., ...}}, "param_groups": [...]}`."""
    if not is_sharded(trainable):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(trainable, optimizer)


def save_sharded(state: dict[str, Any], directory: Path, ranks: Ranks) -> None:
    """Every rank writes its shards of `state` (tensors only) to `directory` (torch.distributed.checkpoint:
    one `__R_0.distcp` file per rank and rank 0's `.metadata`)."""
    import torch.distributed.checkpoint as dcp

    if ranks.is_main:
        directory.mkdir(parents=True, exist_ok=True)
    ranks.barrier()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(directory))
    ranks.barrier()


def load_optimizer_state(
    trainable: nn.Module, optimizer: torch.optim.Optimizer, stored: dict[str, Any], checkpoint: Path
) -> None:
    """Restore what `optimizer_state` stored: as is on one rank and under DDP; under FSDP (a collective)
    this rank's shards from the checkpoint's `SHARDED_DIR`, with the param groups kept in `stored`."""
    if not is_sharded(trainable):
        optimizer.load_state_dict(stored)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    template = get_optimizer_state_dict(trainable, optimizer)  # the shards' shapes to read into
    shards = {"state": template["state"]}
    dcp.load(shards, storage_reader=SafeFileSystemReader(checkpoint / SHARDED_DIR))
    state = {"state": shards["state"], "param_groups": stored["param_groups"]}
    set_optimizer_state_dict(trainable, optimizer, optim_state_dict=state)


# ---------------------------------------------------------------------------- reading DCP safely
# torch.distributed.checkpoint's `.metadata` is a pickle. Nothing in a checkpoint may run code when it is
# read, so it is unpickled with only the classes DCP's metadata is made of; the shard files themselves are
# read by DCP with `torch.load(weights_only=True)`. Non-tensor entries (which DCP would unpickle freely)
# are never stored there: `save_sharded` gets tensors only, and the reader refuses any.
_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *(
        (_METADATA, name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by its name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Exact names only: a dotted name could reach any attribute of an allowed class.
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's sharded metadata")


def _load_metadata(data: bytes) -> Any:
    return _MetadataUnpickler(io.BytesIO(data)).load()


def SafeFileSystemReader(path: Path) -> Any:  # noqa: N802 (a class built on first use: torch imports late)
    """A `FileSystemReader` whose metadata is unpickled with only DCP's own classes allowed."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = _load_metadata(Path(self.path, ".metadata").read_bytes())
            if any(isinstance(m, BytesStorageMetadata) for m in metadata.state_dict_metadata.values()):
                raise pickle.UnpicklingError("sharded state holds a non-tensor entry (never written here)")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(path)

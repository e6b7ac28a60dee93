"""Training checkpoints: `output_dir/checkpoints/step-XXXXXXXX/` (see `core.distill.layout`).

Each one is a Hugging Face directory of the student (config, safetensors, tokenizer, generation config) plus

    trainer_state.safetensors   every tensor of the trainer state (optimizer moments, torch RNG states)
    trainer_state.json          the rest: step, scheduler, python and numpy RNG states, data position,
                                strategy (replay buffer) and TAID state, last metrics
    spec.json                   the JobSpec that produced it
    optimizer-shards/           (FSDP only) every rank's optimizer shards (torch.distributed.checkpoint);
                                trainer_state.json then keeps only the optimizer's param groups
    manifest.json               format version, step, and every other file's size and SHA-256 (those in
                                subdirectories too); written last

Nothing in a checkpoint is unpickled (but the sharded metadata, with only its own classes allowed:
`core.distill.distributed`), so whoever can write to the storage cannot run code in the worker.
A checkpoint is assembled in a hidden temporary directory, fsynced, and renamed into place, so a crash never
leaves a half-written `step-*` directory. `verify_checkpoint` re-hashes the files against the manifest;
`find_checkpoint` returns the newest checkpoint that verifies and lists the newer ones it skipped, which
`set_aside_checkpoint` renames to `step-XXXXXXXX.corrupt` (kept for inspection, never listed or used).

Checkpoints written before manifests existed (format 1: `trainer_state.pt`, no manifest) are still resumed:
their state is read with `torch.load(weights_only=True)` with numpy's array constructors as the only allowed
globals (so they cannot run code either), and they count as verified when their state and weights load.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from core.distill.layout import checkpoint_path, checkpoints_dir, parse_checkpoint_name
from core.distill.models import save_student
from core.distill.spec import JobSpec

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
SPEC_FILE = "spec.json"
LEGACY_STATE = "trainer_state.pt"  # format 1
SHARDED_DIR = "optimizer-shards"
CORRUPT_SUFFIX = ".corrupt"
_REQUIRED = (STATE_TENSORS, STATE_JSON, SPEC_FILE, "config.json")
_STORAGE_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# What libraries that wrap the write call (safetensors' Rust writer, torch's stream writer) say instead.
_STORAGE_FULL_TEXTS = (
    "no space left on device",
    "disk quota exceeded",
    "storagefull",
    "quotaexceeded",
    "os error 28)",
    "os error 122)",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and the problem."""


class StorageFullError(OSError):
    """The artifact storage ran out of space (or quota) while writing `what`."""

    def __init__(self, what: str) -> None:
        super().__init__(
            errno.ENOSPC,
            f"the artifact storage is full while writing {what}: free space or raise the quota",
        )

    def __str__(self) -> str:
        return self.strerror or ""


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint that failed verification, and why."""

    step: int
    path: Path
    problem: str


@dataclass(frozen=True)
class CheckpointSearch:
    """The newest checkpoint that verifies (None when none does) and the newer ones that did not."""

    checkpoint: Path | None
    skipped: list[SkippedCheckpoint]


# ------------------------------------------------------------------------------------------- finding
def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Every `step-XXXXXXXX` directory of a run, oldest first (verified or not: see `find_checkpoint`)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = parse_checkpoint_name(child.name)
        if step is not None and child.is_dir():
            found.append((step, child))
    return sorted(found)


def find_checkpoint(output_dir: Path) -> CheckpointSearch:
    """The newest checkpoint that verifies, and the newer ones skipped because they did not."""
    skipped = []
    for step, path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return CheckpointSearch(path, skipped)
        skipped.append(SkippedCheckpoint(step, path, problem))
    return CheckpointSearch(None, skipped)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint under `output_dir/checkpoints` that verifies, or None."""
    return find_checkpoint(output_dir).checkpoint


def set_aside_checkpoint(path: Path) -> Path:
    """Rename a corrupt checkpoint to `step-XXXXXXXX.corrupt[-N]`: kept for inspection, never used again."""
    path = Path(path)
    target, n = path.with_name(path.name + CORRUPT_SUFFIX), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}-{n}")
    path.rename(target)
    _verified.pop(str(path), None)
    return target


# ------------------------------------------------------------------------------------------ verifying
# Checkpoints this process hashed (while writing or verifying) with the stat signature they had then: a
# resume verifies the checkpoint it picked again, which need not read gigabytes of weights twice.
_verified: dict[str, tuple[tuple[str, int, int, int, int], ...]] = {}


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint at `path` is complete and intact, else what is wrong with it."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if not (path / MANIFEST).is_file():
        if (path / LEGACY_STATE).is_file():
            return _verify_legacy(path)
        return f"no {MANIFEST} (an incomplete or foreign directory)"
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = {entry["path"]: (int(entry["size"]), str(entry["sha256"])) for entry in manifest["files"]}
        version, step = manifest["format"], manifest["step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} ({type(exc).__name__}: {exc})"
    if version != FORMAT_VERSION:
        return f"unknown checkpoint format {version!r} (this version reads {FORMAT_VERSION})"
    if step != parse_checkpoint_name(path.name):
        return f"{MANIFEST} is for step {step}, not {path.name}"
    if missing := [name for name in _REQUIRED if name not in files]:
        return f"{MANIFEST} lists no {', '.join(missing)}"
    present = _relative_files(path)
    if unlisted := sorted(set(present) - set(files) - {MANIFEST}):
        return f"{unlisted[0]} is not in {MANIFEST}"
    for name, (size, _) in files.items():
        if name not in present:
            return f"{name} is missing"
        if not present[name].is_file() or present[name].is_symlink():
            return f"{name} is not a regular file"
        if present[name].stat().st_size != size:
            return f"{name} has {present[name].stat().st_size} bytes, the manifest says {size}"
    signature = _signature(present)
    if _verified.get(str(path)) == signature:
        return None
    for name, (_, digest) in sorted(files.items()):
        if _sha256(present[name]) != digest:
            return f"{name} does not match its SHA-256 in {MANIFEST}"
    _verified[str(path)] = signature
    return None


def _verify_legacy(path: Path) -> str | None:
    """A format-1 checkpoint has no manifest: it is good when its trainer state and weights load."""
    weights = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not (path / SPEC_FILE).is_file() or not weights:
        return "format-1 checkpoint without config.json, spec.json or safetensors weights"
    try:
        _load_legacy_state(path)
        for file in weights:
            safetensors.torch.load_file(file)
        load_checkpoint_spec(path)
    except Exception as exc:
        return f"format-1 checkpoint does not load ({type(exc).__name__}: {str(exc)[:300]})"
    return None


def _relative_files(path: Path) -> dict[str, Path]:
    return {p.relative_to(path).as_posix(): p for p in path.rglob("*") if not p.is_dir()}


def _signature(present: dict[str, Path]) -> tuple[tuple[str, int, int, int, int], ...]:
    # ctime changes on every write and cannot be set back (unlike mtime); renaming the checkpoint's
    # directory changes none of these.
    stats = {name: file.stat() for name, file in present.items()}
    return tuple(sorted((n, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) for n, s in stats.items()))


def _sha256(file: Path, *, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------------- writing
def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    student: nn.Module,
    tokenizer: Any,
    spec: JobSpec,
    trainer_state: dict[str, Any],
    sharded: Path | None = None,
) -> Path:
    """Write checkpoint `step` atomically and return its path. Raises `StorageFullError` when the disk or
    quota is full (nothing partial is left behind). `sharded`: a directory every rank wrote its shards to
    (FSDP), moved into the checkpoint as `optimizer-shards/` and covered by the manifest."""
    final = checkpoint_path(output_dir, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    final.parent.mkdir(parents=True, exist_ok=True)
    with storage_errors(f"the checkpoint of step {step}"):
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            save_student(student, tokenizer, tmp)
            if sharded is not None:
                os.replace(sharded, tmp / SHARDED_DIR)
            write_trainer_state(tmp, trainer_state)
            (tmp / SPEC_FILE).write_text(spec.model_dump_json(indent=2), encoding="utf-8")
            _write_manifest(tmp, step)
            replaced = final.parent / f".replaced-{final.name}-{os.getpid()}"
            if final.exists():
                # Re-saving a step (a resumed run stopping where it started): a directory cannot be renamed
                # over a non-empty one, so the old copy steps aside first and is deleted after.
                shutil.rmtree(replaced, ignore_errors=True)
                final.rename(replaced)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            shutil.rmtree(replaced, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    # Just hashed while writing: a resume or a prune in this process need not read it again.
    _verified[str(final)] = _signature(_relative_files(final))
    return final


def _write_manifest(directory: Path, step: int) -> None:
    """Hash (and fsync) every file of `directory`, then write the manifest last."""
    files = [
        {"path": name, "size": file.stat().st_size, "sha256": _sha256(file, sync=True)}
        for name, file in sorted(_relative_files(directory).items())
    ]
    manifest = {"format": FORMAT_VERSION, "step": step, "files": files}
    with (directory / MANIFEST).open("w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    for sub in sorted({p.parent for p in directory.rglob("*")}):
        _fsync_dir(sub)


def prune_checkpoints(output_dir: Path, *, keep: int, current: Path) -> list[SkippedCheckpoint]:
    """Keep `current` and the newest others that verify, `keep` in all; delete older ones. A corrupt one met
    on the way is set aside (returned) and not counted, so a corrupt newer checkpoint never costs the last
    good one."""
    kept, set_aside = 1, []
    for step, path in reversed(list_checkpoints(output_dir)):
        if path == current:
            continue
        if kept >= keep:
            _delete(path)
            continue
        problem = verify_checkpoint(path)
        if problem is None:
            kept += 1
        else:
            set_aside.append(SkippedCheckpoint(step, set_aside_checkpoint(path), problem))
    return set_aside


def _delete(path: Path) -> None:
    """Rename, then delete: a crash halfway leaves a hidden directory, never a half-deleted checkpoint."""
    hidden = path.parent / f".pruned-{path.name}-{os.getpid()}"
    shutil.rmtree(hidden, ignore_errors=True)
    path.rename(hidden)
    _verified.pop(str(path), None)
    shutil.rmtree(hidden, ignore_errors=True)


def sweep_leftovers(output_dir: Path, *, older_than_s: float = 3600.0) -> None:
    """Delete hidden directories a killed writer left in `checkpoints/` (temporary copies, half-pruned
    checkpoints) once they are old enough that no live writer can still own them."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return
    cutoff = time.time() - older_than_s
    for child in root.iterdir():
        with contextlib.suppress(OSError):
            if child.name.startswith(".") and child.is_dir() and child.stat().st_mtime < cutoff:
                shutil.rmtree(child, ignore_errors=True)


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn an out-of-space error (however a library words it) while writing `what` into `StorageFullError`."""
    try:
        yield
    except StorageFullError:
        raise
    except Exception as exc:
        if is_storage_full(exc):
            raise StorageFullError(what) from exc
        raise


def is_storage_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) means the disk or the quota is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _STORAGE_FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _STORAGE_FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


# ------------------------------------------------------------------------------------- trainer state
def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and every CUDA device)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    """`state` as `trainer_state.safetensors` (its tensors) and `trainer_state.json` (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "state", tensors)
    safetensors.torch.save_file(tensors, directory / STATE_TENSORS)
    text = json.dumps({"format": FORMAT_VERSION, "state": encoded})
    (directory / STATE_JSON).write_text(text, encoding="utf-8")


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, read without unpickling anything. Does not verify the checkpoint
    (see `verify_checkpoint`); raises `CheckpointError` when the state does not decode."""
    checkpoint = Path(checkpoint)
    try:
        if not (checkpoint / STATE_JSON).is_file() and (checkpoint / LEGACY_STATE).is_file():
            return _load_legacy_state(checkpoint)
        stored = json.loads((checkpoint / STATE_JSON).read_text(encoding="utf-8"))
        if stored.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown trainer state format {stored.get('format')!r}")
        tensors = safetensors.torch.load_file(checkpoint / STATE_TENSORS, device="cpu")
        state = _decode(stored["state"], tensors)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{checkpoint}: the trainer state does not load ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{checkpoint}: the trainer state is not a mapping")
    return state


def _load_legacy_state(checkpoint: Path) -> dict[str, Any]:
    """A format-1 `trainer_state.pt`: the weights-only unpickler, with numpy's RNG state arrays allowed."""
    reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
    allowed: list[Any] = [
        np.ndarray,
        np.dtype,
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # pickled by numpy 1.x
    ]
    allowed += [getattr(np.dtypes, name) for name in ("UInt32DType", "Float64DType", "Int64DType")]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(checkpoint / LEGACY_STATE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{checkpoint}: the trainer state is not a mapping")
    return state


def load_checkpoint_spec(checkpoint: Path) -> JobSpec:
    """The JobSpec stored with a checkpoint."""
    return JobSpec.model_validate(json.loads((Path(checkpoint) / SPEC_FILE).read_text(encoding="utf-8")))


# A nested state holds tensors, numpy arrays, tuples and int-keyed dicts, none of which JSON keeps: each is
# written as a one-key tagged object, and a dict whose keys could be mistaken for a tag is tagged too.
_TENSOR, _ARRAY, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two trainer state tensors named {key}")
        tensors[key] = value.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{key}: a numpy array of dtype {value.dtype} cannot be stored")
        return {_ARRAY: value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
        return {_DICT: [[_encode(k, key, {}), _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, np.generic):
        return _encode(value.item(), key, tensors)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{key}: a {type(value).__name__} cannot be stored in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _ARRAY in value:
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"numpy dtype {dtype} in a trainer state")
        return np.array(value[_ARRAY], dtype=dtype)
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _DICT in value:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value[_DICT]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, torch.Tensor, np.ndarray)):
        raise ValueError(f"a {type(key).__name__} as a dict key in a trainer state")
    return key

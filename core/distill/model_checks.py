"""Checks on model references, tokenizers and vocabulary sizes.

Kept free of torch and transformers imports so that the API can validate a job without loading them;
`core.distill.models` re-exports everything here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# "org/name" or "name": what the hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


class ModelReferenceError(ValueError):
    """A model reference (local path, GGUF file or hub id) is refused; the message says why."""


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers (or a model and its tokenizer) disagree."""


# A directory walk bounded to this many entries: a model folder holds a handful of files.
_MAX_MODEL_ENTRIES = 10_000


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def shown_model(model: str, roots: Sequence[Path]) -> str:
    """How a model reference is named in messages a tenant reads: a path under a model folder relative to
    that folder (`tiny-teacher`), never the server's absolute path to it."""
    path = Path(model)
    if path.is_absolute():
        for root in roots:
            if _inside(path, [root]):
                return path.relative_to(root).as_posix() or "."
        return path.name
    return model


def _relative_syntax(model: str) -> bool:
    """`./x`, `../x`, `~/x`, `x\\y`: relative to the server's working or home folder, which a client
    cannot know; such a reference is refused rather than resolved differently by the API and a worker."""
    return model.startswith(("./", "../", "~")) or model in (".", "..") or "\\" in model


def _check_links_inside(folder: Path, roots: Sequence[Path], shown: str) -> None:
    """Every symbolic link in a model folder (files included, not only the folder itself) must point inside
    the model folders: otherwise a tenant could read any file the server can through a model folder."""
    seen = 0
    for directory, subdirectories, files in os.walk(folder):
        for name in (*subdirectories, *files):
            seen += 1
            if seen > _MAX_MODEL_ENTRIES:
                raise ModelReferenceError(
                    f"model folder {shown!r} holds more than {_MAX_MODEL_ENTRIES} files"
                )
            entry = Path(directory) / name
            if entry.is_symlink() and not _inside(entry.resolve(), roots):
                relative = entry.relative_to(folder).as_posix()
                raise ModelReferenceError(
                    f"{relative!r} in model folder {shown!r} links outside the allowed model folders"
                )


def check_model_reference(
    model: str, gguf_file: str | None, *, model_roots: Sequence[Path], allow_hub: bool
) -> str:
    """Refuse a reference that is not a local model under `model_roots`, or a hub id when hubs are off;
    return what to load: the absolute path of a local model, or the hub id.

    An absolute reference is a path; a relative one names a path under one of `model_roots` (never under
    the server's working folder), and one found under none of them is a hub id. A local model must hold
    `config.json` (or `gguf_file`, or be a `.gguf` file itself) and, with every symlink resolved (those of
    the files inside it too), lie inside one of `model_roots`. Messages never show a server path.
    """
    if not model or not model.strip():
        raise ModelReferenceError("the model reference is empty")
    if "\x00" in model or (gguf_file is not None and "\x00" in gguf_file):
        raise ModelReferenceError("the model reference holds a NUL character")
    if gguf_file is not None and (
        not gguf_file or os.sep in gguf_file or "/" in gguf_file or gguf_file in (".", "..")
    ):
        raise ModelReferenceError(
            f"gguf_file {gguf_file!r} must be a plain file name inside the model folder"
        )
    roots = [Path(root).expanduser().resolve() for root in model_roots]
    shown = shown_model(model, roots)
    try:
        return _check_local_or_hub(model, gguf_file, roots, shown, allow_hub)
    except OSError as exc:  # ENAMETOOLONG, EACCES, ELOOP...: refused, with the reason but not the path
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise ModelReferenceError(f"model path {shown!r} cannot be read ({reason})") from exc


def _check_local_or_hub(
    model: str, gguf_file: str | None, roots: Sequence[Path], shown: str, allow_hub: bool
) -> str:
    if _relative_syntax(model):
        raise ModelReferenceError(
            f"model path {model!r} is relative to the server's folders; name a model inside the model "
            "folders (`name` or `name/sub`) or give an absolute path"
        )
    path = Path(model)
    if not path.is_absolute():
        found = next((root / path for root in roots if (root / path).exists()), None)
        if found is None:
            if not _HUB_ID.match(model) or ".." in model:
                raise ModelReferenceError(f"{model!r} is neither an existing local path nor a valid hub id")
            if not allow_hub:
                raise ModelReferenceError(
                    f"{model!r} is not a local path and downloads from the model hub are disabled"
                )
            return model
        path = found
    if not path.exists():
        raise ModelReferenceError(f"model path {shown!r} does not exist")
    resolved = path.resolve(strict=True)
    if not _inside(resolved, roots):
        raise ModelReferenceError(f"model path {shown!r} is outside the allowed model folders")
    if resolved.is_file():
        if gguf_file is None and resolved.suffix == ".gguf":
            return str(path)
        raise ModelReferenceError(f"model path {shown!r} is a file; expected a model folder or a .gguf file")
    if gguf_file is not None:
        target = resolved / gguf_file
        if not target.is_file():
            raise ModelReferenceError(f"GGUF file {gguf_file!r} not found in {shown!r}")
        if not _inside(target.resolve(), roots):
            raise ModelReferenceError(f"GGUF file {gguf_file!r} links outside the allowed model folders")
    elif not (resolved / "config.json").is_file():
        raise ModelReferenceError(f"model folder {shown!r} has no config.json")
    _check_links_inside(resolved, roots, shown)
    return str(path)


def _token_name(vocab_by_id: dict[int, str], token_id: int) -> str:
    return repr(vocab_by_id.get(token_id, "<absent>"))


def check_tokenizers_compatible(teacher_tok: Any, student_tok: Any) -> None:
    """Raise `TokenizerMismatchError` unless both tokenizers map the same tokens to the same ids and agree
    on the special tokens (bos, eos, pad, unk)."""
    teacher_vocab, student_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if teacher_vocab != student_vocab:
        teacher_by_id = {i: t for t, i in teacher_vocab.items()}
        student_by_id = {i: t for t, i in student_vocab.items()}
        differing = [
            i
            for i in sorted(set(teacher_by_id) | set(student_by_id))
            if teacher_by_id.get(i) != student_by_id.get(i)
        ]
        shown = "; ".join(
            f"id {i}: teacher {_token_name(teacher_by_id, i)} vs student {_token_name(student_by_id, i)}"
            for i in differing[:5]
        )
        raise TokenizerMismatchError(
            f"teacher and student tokenizers differ ({len(teacher_vocab)} vs {len(student_vocab)} tokens, "
            f"{len(differing)} ids differ); first: {shown}"
        )
    for name in _SPECIAL_TOKENS:
        teacher_id, student_id = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
        if teacher_id != student_id:
            raise TokenizerMismatchError(
                f"special token {name.removesuffix('_id')} differs: teacher id {teacher_id}, "
                f"student id {student_id}"
            )


def logits_width(model: Any) -> int:
    """The number of logits the model outputs per position (its head's rows; may exceed the tokenizer)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def effective_vocab_size(teacher: Any, student: Any, tokenizer: Any) -> int:
    """How many leading logits teacher and student share: slice both to `[..., :n]` before the loss.

    A model whose head is padded beyond the tokenizer (for hardware-friendly sizes) is accepted; its extra
    entries never correspond to a token. A head smaller than the tokenizer is refused.
    """
    needed = len(tokenizer)
    widths = {"teacher": logits_width(teacher), "student": logits_width(student)}
    for role, width in widths.items():
        if width < needed:
            raise TokenizerMismatchError(
                f"the {role} outputs {width} logits but the tokenizer has {needed} tokens"
            )
    return min(widths.values())

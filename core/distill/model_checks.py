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


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or "\\" in model or Path(model).exists()


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_model_reference(
    model: str, gguf_file: str | None, *, model_roots: Sequence[Path], allow_hub: bool
) -> None:
    """Refuse a reference that is not a local model under `model_roots`, or a hub id when hubs are off.

    A local reference must exist, hold `config.json` (or `gguf_file`, or be a `.gguf` file itself) and,
    with every symlink resolved, lie inside one of `model_roots`. Anything else that looks like
    `org/name` is a hub id.
    """
    if not model or not model.strip():
        raise ModelReferenceError("the model reference is empty")
    if gguf_file is not None and (
        not gguf_file or os.sep in gguf_file or "/" in gguf_file or gguf_file in (".", "..")
    ):
        raise ModelReferenceError(
            f"gguf_file {gguf_file!r} must be a plain file name inside the model folder"
        )
    if not _looks_like_path(model):
        if not _HUB_ID.match(model) or ".." in model:
            raise ModelReferenceError(f"{model!r} is neither an existing local path nor a valid hub id")
        if not allow_hub:
            raise ModelReferenceError(
                f"{model!r} is not a local path and downloads from the model hub are disabled"
            )
        return

    path = Path(model).expanduser()
    if not path.exists():
        raise ModelReferenceError(f"model path {model!r} does not exist")
    resolved = path.resolve(strict=True)
    roots = [Path(root).expanduser().resolve() for root in model_roots]
    if not _inside(resolved, roots):
        allowed = ", ".join(str(root) for root in roots) or "(none configured)"
        raise ModelReferenceError(f"model path {model!r} is outside the allowed model folders: {allowed}")
    if resolved.is_file():
        if gguf_file is None and resolved.suffix == ".gguf":
            return
        raise ModelReferenceError(f"model path {model!r} is a file; expected a model folder or a .gguf file")
    if gguf_file is not None:
        target = resolved / gguf_file
        if not target.is_file():
            raise ModelReferenceError(f"GGUF file {gguf_file!r} not found in {model!r}")
        if not _inside(target.resolve(), roots):
            raise ModelReferenceError(f"GGUF file {gguf_file!r} links outside the allowed model folders")
        return
    if not (resolved / "config.json").is_file():
        raise ModelReferenceError(f"model folder {model!r} has no config.json")


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

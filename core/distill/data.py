"""Training data: JSONL records in three formats, their validation, tokenization and batching.

Formats (one JSON object per line):
- `instruction`: {"instruction", "input" (optional, may be empty), "output"}, rendered with the Alpaca prompt.
- `chat`: {"messages": [{"role", "content"}, ...]} ending with an assistant turn; the prompt is every earlier
  turn through the tokenizer's chat template with the generation prompt, the response is the last assistant
  message. Instruction records are accepted too, as one user turn (`instruction_as_chat`).
- `text`: {"text"}; no prompt, every token is trained on.

Labels have the length of `input_ids` and are NOT shifted (the trainer shifts); prompt positions hold -100.
Prompts longer than `max_prompt_length` lose their MIDDLE (`truncate_middle`): the template header and
instruction at the start, and the response cue ("### Response:" or the chat generation prompt) at the end,
must survive, as generation needs them. The whole sequence is then cut to `max_length` from the right, which
shortens the response (and may drop its eos).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from core.distill.data_formats import (
    FORMATS,
    DataError,
    FileReport,
    InvalidLine,
    detect_format,
    inspect_jsonl,
    instruction_as_chat,
    is_blank,
    parse_line,
    render_instruction_prompt,
    validate_record,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "DataError",
    "DistillDataset",
    "Example",
    "FileReport",
    "InvalidLine",
    "LoadedRecords",
    "build_student_example",
    "collate",
    "collate_prompts",
    "detect_format",
    "encode_example",
    "truncate_middle",
    "inspect_jsonl",
    "instruction_as_chat",
    "load_records",
    "render_instruction_prompt",
    "validate_record",
]

IGNORE_INDEX = -100


@dataclass
class LoadedRecords:
    records: list[dict[str, Any]]
    skipped: int = 0
    invalid: list[InvalidLine] = field(default_factory=list)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    reference: str


def load_records(path: str | Path, fmt: str, *, skip_invalid: bool = False) -> LoadedRecords:
    """Read and validate a JSONL file; a bad line raises `DataError` (file:line) unless `skip_invalid`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    loaded = LoadedRecords(records=[])
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if is_blank(raw):
                continue
            record, error = parse_line(raw)
            if error is None:
                error = validate_record(record, fmt)
            if error is None:
                loaded.records.append(record)
            elif skip_invalid:
                loaded.skipped += 1
                loaded.invalid.append(InvalidLine(number, error))
            else:
                raise DataError(f"{path}, line {number}: {error}", path=str(path), line=number)
    if not loaded.records:
        raise DataError(f"{path}: no valid {fmt} records", path=str(path))
    return loaded


def _prompt_and_response(
    record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, fmt: str
) -> tuple[list[int], str]:
    """Token ids of the untruncated prompt, and the response text."""
    if fmt == "text":
        # Only the tokens the tokenizer itself prepends (a bos, for some) count as the prompt.
        with_special = list(tokenizer(record["text"], add_special_tokens=True)["input_ids"])
        plain = list(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
        prefix = 0
        while prefix < len(with_special) and with_special[prefix : prefix + len(plain)] != plain:
            prefix += 1
        return with_special[:prefix] if prefix < len(with_special) else [], record["text"]
    if fmt == "chat":
        if "messages" not in record:
            record = instruction_as_chat(record)
        messages = record["messages"]
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        # The template already holds any bos it wants; do not let the tokenizer add another.
        return list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"]), messages[-1]["content"]
    if fmt == "instruction":
        ids = list(tokenizer(render_instruction_prompt(record), add_special_tokens=True)["input_ids"])
        if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]  # tokenizers that append eos would end the prompt before the response
        return ids, record["output"]
    raise ValueError(f"unknown format {fmt!r}")


def truncate_middle(ids: list[int], limit: int) -> list[int]:
    """Keep the first and the last `limit // 2`-ish tokens of an over-long prompt, dropping its middle.

    The start holds the template's header and the instruction, the end the latest context and the response
    cue ("### Response:" or the chat template's generation prompt); generation needs both, while the middle
    of a long context passage is the least harmful part to lose.
    """
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :]


def encode_example(
    record: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    fmt: str,
    *,
    max_length: int,
    max_prompt_length: int,
) -> Example | None:
    """Tokenize one validated record; None when no response token survives truncation."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token; responses must end with one")
    prompt_ids, response = _prompt_and_response(record, tokenizer, fmt)
    prompt_ids = truncate_middle(prompt_ids, max_prompt_length)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    prompt_ids = prompt_ids[:max_length]
    if len(input_ids) <= len(prompt_ids):
        return None
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
    return Example(input_ids=input_ids, labels=labels, prompt_ids=prompt_ids, reference=response)


def build_student_example(
    prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, max_length: int
) -> Example:
    """An on-policy sample: prompt + generated response, labelled exactly like a dataset example.

    The response is cut after its first eos (what follows is padding); a response that ran out of tokens
    without an eos gets none appended, since the student never chose to stop there. The prompt is masked
    on exactly `len(prompt_ids)` positions, as in `encode_example`.
    """
    response = list(response_ids)
    if eos_id in response:
        response = response[: response.index(eos_id) + 1]
    prompt = list(prompt_ids)[:max_length]
    input_ids = (prompt + response)[:max_length]
    labels = [IGNORE_INDEX] * len(prompt) + input_ids[len(prompt) :]
    return Example(input_ids=input_ids, labels=labels, prompt_ids=prompt, reference="")


class DistillDataset(Dataset):
    """Encoded examples of a list of records; records with no response token left are dropped and counted."""

    def __init__(
        self,
        records: Iterable[dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        fmt: str,
        *,
        max_length: int,
        max_prompt_length: int,
    ) -> None:
        self.examples: list[Example] = []
        self.dropped = 0
        for record in records:
            example = encode_example(
                record, tokenizer, fmt, max_length=max_length, max_prompt_length=max_prompt_length
            )
            if example is None:
                self.dropped += 1
            else:
                self.examples.append(example)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask and labels, each (batch, longest) int64."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(
    prompt_id_lists: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation: (input_ids, attention_mask), each (batch, longest) int64."""
    if not prompt_id_lists:
        raise ValueError("cannot collate an empty batch")
    width = max(len(p) for p in prompt_id_lists)
    input_ids = torch.full((len(prompt_id_lists), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_id_lists), width), dtype=torch.long)
    for row, prompt in enumerate(prompt_id_lists):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask

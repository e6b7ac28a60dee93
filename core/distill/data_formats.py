"""The three record formats: validation, detection, the Alpaca prompt and whole-file inspection.

Pure functions with no torch or tokenizer import, so the API can check uploads cheaply."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FORMATS = ("instruction", "chat", "text")
CHAT_ROLES = ("system", "user", "assistant")

# The prompt of the instruction-following papers (Alpaca; used by MiniLLM, DistiLLM and AMiD on Dolly).
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)


class DataError(ValueError):
    """A training file or record is malformed; the message names the file and 1-based line when known."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


def render_instruction_prompt(record: dict[str, Any]) -> str:
    """The Alpaca prompt for an instruction record (the variant with input when `input` is non-empty)."""
    source = record.get("input") or ""
    if source.strip():
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=source)
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def instruction_as_chat(record: dict[str, Any]) -> dict[str, Any]:
    """An instruction record as a chat: one user turn (instruction, blank line, input) and the answer."""
    user = record["instruction"]
    source = record.get("input") or ""
    if source.strip():
        user = f"{user}\n\n{source}"
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": record["output"]},
        ]
    }


def detect_format(record: Any) -> str | None:
    """The format a record looks like, from its keys; None when it looks like none of them."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "instruction"
    if "text" in record:
        return "text"
    return None


def _string_field(record: dict[str, Any], key: str, *, required: bool, non_empty: bool) -> str | None:
    if key not in record:
        return f"missing field '{key}'" if required else None
    value = record[key]
    if not isinstance(value, str):
        return f"field '{key}' must be a string, got {type(value).__name__}"
    if non_empty and not value.strip():
        return f"field '{key}' is empty"
    return None


def _validate_instruction(record: dict[str, Any]) -> str | None:
    return (
        _string_field(record, "instruction", required=True, non_empty=True)
        or _string_field(record, "input", required=False, non_empty=False)
        or _string_field(record, "output", required=True, non_empty=True)
    )


def _validate_chat(record: dict[str, Any]) -> str | None:
    if "messages" not in record:
        if "instruction" in record:
            return _validate_instruction(record)
        return "missing field 'messages'"
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{index}] must be an object"
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            return f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
        if not isinstance(content, str):
            return f"messages[{index}].content must be a string"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's response"
    if not messages[-1]["content"].strip():
        return "the last (assistant) message is empty"
    return None


def validate_record(record: Any, fmt: str) -> str | None:
    """None when `record` is a valid `fmt` record, else a one-line description of what is wrong."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    if fmt == "instruction":
        return _validate_instruction(record)
    if fmt == "chat":
        return _validate_chat(record)
    return _string_field(record, "text", required=True, non_empty=True)


@dataclass(frozen=True)
class InvalidLine:
    line: int  # 1-based
    error: str


@dataclass
class FileReport:
    records: int
    invalid_lines: list[dict[str, Any]]  # [{"line": n, "error": msg}], at most max_errors entries
    detected_format: str | None
    invalid_count: int = 0  # every invalid line, including those beyond max_errors


def parse_line(raw: bytes | str) -> tuple[Any, str | None]:
    """(record, None) or (None, error) for one JSONL line."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        return json.loads(raw), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})"


def is_blank(raw: bytes | str) -> bool:
    return not raw.strip()


def inspect_jsonl(lines: Iterable[bytes | str], fmt: str | None = None, max_errors: int = 50) -> FileReport:
    """Parse and validate every line; report the count of valid records and the invalid lines by number.

    Blank lines are ignored. With `fmt=None` the format is detected from the first JSON object and every
    line is validated against it.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    count, invalid, invalid_count = 0, [], 0
    for number, raw in enumerate(lines, start=1):
        if is_blank(raw):
            continue
        record, error = parse_line(raw)
        if error is None:
            if fmt is None:
                fmt = detect_format(record)
            error = (
                validate_record(record, fmt)
                if fmt is not None
                else "cannot tell the format: expected 'instruction', 'messages' or 'text'"
            )
        if error is None:
            count += 1
        else:
            invalid_count += 1
            if len(invalid) < max_errors:
                invalid.append({"line": number, "error": error})
    return FileReport(records=count, invalid_lines=invalid, detected_format=fmt, invalid_count=invalid_count)

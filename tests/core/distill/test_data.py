"""Data formats, validation with line numbers, tokenization, masking, truncation and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from core.distill.data import (
    IGNORE_INDEX,
    DataError,
    DistillDataset,
    build_student_example,
    collate,
    collate_prompts,
    encode_example,
    inspect_jsonl,
    instruction_as_chat,
    load_records,
    render_instruction_prompt,
    validate_record,
)

EXPECTED_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
)
EXPECTED_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarize.\n\n"
    "### Input:\nCats sleep a lot.\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_templates_render_exactly() -> None:
    assert render_instruction_prompt({"instruction": "Name a color.", "input": "", "output": "x"}) == (
        EXPECTED_NO_INPUT
    )
    assert render_instruction_prompt({"instruction": "Name a color.", "output": "x"}) == EXPECTED_NO_INPUT
    record = {"instruction": "Summarize.", "input": "Cats sleep a lot.", "output": "x"}
    assert render_instruction_prompt(record) == EXPECTED_WITH_INPUT


def test_instruction_example_masks_prompt_and_ends_with_eos(tok) -> None:
    record = {"instruction": "Summarize.", "input": "Cats sleep a lot.", "output": "They nap."}
    ex = encode_example(record, tok, "instruction", max_length=512, max_prompt_length=256)
    prompt = _ids(tok, EXPECTED_WITH_INPUT)
    response = _ids(tok, "They nap.") + [tok.eos_token_id]
    assert ex.prompt_ids == prompt
    assert ex.input_ids == prompt + response
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response
    assert len(ex.labels) == len(ex.input_ids)
    assert ex.reference == "They nap."


def test_long_prompt_keeps_its_start_and_end_and_sequence_is_cut(tok) -> None:
    record = {"instruction": "Summarize.", "input": "word " * 200, "output": "Short answer here. " * 20}
    full_prompt = _ids(tok, render_instruction_prompt(record))
    assert len(full_prompt) > 40
    ex = encode_example(record, tok, "instruction", max_length=60, max_prompt_length=40)
    assert ex.prompt_ids == full_prompt[:20] + full_prompt[-20:]
    assert tok.decode(ex.prompt_ids).startswith("Below is an instruction")
    assert tok.decode(ex.prompt_ids).endswith("### Response:\n")
    assert len(ex.input_ids) == 60
    assert ex.labels[:40] == [IGNORE_INDEX] * 40
    assert ex.labels[40:] == ex.input_ids[40:]
    assert ex.input_ids[-1] != tok.eos_token_id  # the response was cut, so its eos went with it


def test_example_without_response_tokens_is_dropped_and_counted(tok) -> None:
    short_record = {"instruction": "Hi", "input": "", "output": "Hello."}
    limit = len(_ids(tok, render_instruction_prompt(short_record))) + 2
    long_record = {"instruction": "Explain. " * limit, "input": "", "output": "Yes."}
    # A prompt as long as the whole budget leaves no room for a response token.
    assert encode_example(long_record, tok, "instruction", max_length=limit, max_prompt_length=limit) is None
    dataset = DistillDataset(
        [long_record, short_record, long_record],
        tok,
        "instruction",
        max_length=limit,
        max_prompt_length=limit,
    )
    assert dataset.dropped == 2
    assert len(dataset) == 1


def test_chat_prompt_is_template_with_generation_prompt(tok) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
    ]
    ex = encode_example({"messages": messages}, tok, "chat", max_length=512, max_prompt_length=256)
    prompt_text = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert "Hello" in prompt_text  # earlier assistant turns are context, never trained on
    assert ex.prompt_ids == _ids(tok, prompt_text)
    assert ex.input_ids[len(ex.prompt_ids) :] == _ids(tok, "Blue.") + [tok.eos_token_id]
    assert ex.labels[: len(ex.prompt_ids)] == [IGNORE_INDEX] * len(ex.prompt_ids)
    assert ex.reference == "Blue."


def test_chat_format_accepts_instruction_records(tok) -> None:
    record = {"instruction": "Summarize.", "input": "Cats sleep a lot.", "output": "They nap."}
    chat = instruction_as_chat(record)
    assert chat["messages"] == [
        {"role": "user", "content": "Summarize.\n\nCats sleep a lot."},
        {"role": "assistant", "content": "They nap."},
    ]
    assert validate_record(record, "chat") is None
    via_record = encode_example(record, tok, "chat", max_length=512, max_prompt_length=256)
    via_chat = encode_example(chat, tok, "chat", max_length=512, max_prompt_length=256)
    assert via_record == via_chat


def test_text_format_trains_on_every_token(tok) -> None:
    ex = encode_example({"text": "Cats sleep a lot."}, tok, "text", max_length=512, max_prompt_length=256)
    assert ex.prompt_ids == []  # the tiny tokenizer prepends nothing
    assert ex.input_ids == _ids(tok, "Cats sleep a lot.") + [tok.eos_token_id]
    assert ex.labels == ex.input_ids


@pytest.mark.parametrize(
    ("record", "fmt", "fragment"),
    [
        ({"instruction": "a"}, "instruction", "missing field 'output'"),
        ({"instruction": "a", "output": 3}, "instruction", "'output' must be a string"),
        ({"instruction": "a", "output": "  "}, "instruction", "'output' is empty"),
        ({"instruction": "a", "input": None, "output": "b"}, "instruction", "'input' must be a string"),
        (["a"], "instruction", "JSON object"),
        ({"messages": []}, "chat", "non-empty list"),
        ({"messages": [{"role": "user", "content": "a"}]}, "chat", "last message"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "chat", "role"),
        ({"messages": [{"role": "assistant", "content": ""}]}, "chat", "empty"),
        ({"body": "a"}, "text", "missing field 'text'"),
    ],
)
def test_validate_record_names_the_problem(record, fmt, fragment) -> None:
    error = validate_record(record, fmt)
    assert error is not None and fragment in error


def test_malformed_line_raises_with_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    path = _write(tmp_path / "bad.jsonl", [good, "", good, '{"instruction": "a", "output": '])
    with pytest.raises(DataError) as info:
        load_records(path, "instruction")
    assert info.value.line == 4
    assert "line 4" in str(info.value) and "bad.jsonl" in str(info.value)


def test_skip_invalid_counts_and_keeps_good_records(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    lines = [good, "not json", json.dumps({"instruction": "a", "output": ""}), good, "[1]", good]
    loaded = load_records(_write(tmp_path / "mixed.jsonl", lines), "instruction", skip_invalid=True)
    assert len(loaded.records) == 3
    assert loaded.skipped == 3
    assert [bad.line for bad in loaded.invalid] == [2, 3, 5]


def test_file_without_valid_records_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no valid"):
        load_records(_write(tmp_path / "empty.jsonl", ["x"]), "instruction", skip_invalid=True)


def test_inspect_jsonl_detects_format_and_numbers_invalid_lines() -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    lines = [good.encode(), b"\n", b"{oops", good.encode(), b"\xff\xfe", json.dumps({"messages": 1}).encode()]
    report = inspect_jsonl(lines)
    assert report.detected_format == "chat"
    assert report.records == 2
    assert [item["line"] for item in report.invalid_lines] == [3, 5, 6]
    assert "UTF-8" in report.invalid_lines[1]["error"]
    assert report.invalid_count == 3


def test_inspect_jsonl_caps_reported_errors_and_honours_fmt() -> None:
    report = inspect_jsonl(['{"text": "a"}'] + ["bad"] * 10, fmt="instruction", max_errors=4)
    assert report.records == 0
    assert len(report.invalid_lines) == 4
    assert report.invalid_count == 11
    assert report.detected_format == "instruction"


def test_bundled_dolly_files_are_valid(dolly_train_path: Path, dolly_test_path: Path) -> None:
    assert len(load_records(dolly_train_path, "instruction").records) == 1000
    with dolly_test_path.open("rb") as handle:
        report = inspect_jsonl(handle)
    assert (report.records, report.invalid_count, report.detected_format) == (500, 0, "instruction")


def test_collate_right_pads_and_collate_prompts_left_pads(tok) -> None:
    records = [{"text": "Cats sleep a lot today."}, {"text": "Dogs."}]
    examples = [encode_example(r, tok, "text", max_length=64, max_prompt_length=8) for r in records]
    batch = collate(examples, pad_token_id=tok.pad_token_id)
    long, short = len(examples[0].input_ids), len(examples[1].input_ids)
    assert batch["input_ids"].shape == (2, long)
    assert batch["input_ids"][1, :short].tolist() == examples[1].input_ids
    assert (batch["input_ids"][1, short:] == tok.pad_token_id).all()
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (long - short)
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()

    input_ids, mask = collate_prompts([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert input_ids.dtype == mask.dtype == torch.long


def test_student_example_masks_like_dataset_example(tok) -> None:
    record = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    ex = encode_example(record, tok, "instruction", max_length=512, max_prompt_length=256)
    response = ex.input_ids[len(ex.prompt_ids) :]
    pad = tok.pad_token_id
    sampled = build_student_example(ex.prompt_ids, response + [pad, pad], tok.eos_token_id, max_length=512)
    assert sampled.input_ids == ex.input_ids  # cut right after the first eos
    assert sampled.labels == ex.labels
    assert sampled.labels.count(IGNORE_INDEX) == len(ex.prompt_ids)


def test_student_example_without_eos_gets_none_appended(tok) -> None:
    sampled = build_student_example([1, 2, 3], [7, 8, 9], tok.eos_token_id, max_length=5)
    assert sampled.input_ids == [1, 2, 3, 7, 8]
    assert sampled.labels == [IGNORE_INDEX] * 3 + [7, 8]

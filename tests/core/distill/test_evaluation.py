"""ROUGE-L against hand-computed values, and batched generation with left padding."""

from __future__ import annotations

import pytest
import torch

from core.distill.data import DistillDataset, load_records
from core.distill.evaluation import (
    GenerationSettings,
    generate_responses,
    lcs_length,
    rouge_l,
    rouge_l_of_model,
    rouge_tokens,
)
from core.distill.models import load_causal_lm, load_tokenizer


def test_tokens_lowercase_and_split_on_non_alphanumerics():
    assert rouge_tokens("A quick-brown fox! It's 3pm.") == ["a", "quick", "brown", "fox", "it", "s", "3pm"]
    assert rouge_tokens("  ...  ") == []


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a b c d", "a c d", 3),
        ("a b c", "c b a", 1),
        ("x y", "z", 0),
        ("", "a b", 0),
        ("a b a b", "b a b a", 3),
    ],
)
def test_lcs_length(a, b, expected):
    assert lcs_length(a.split(), b.split()) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = 5/6.
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # LCS "quick brown" = 2 of 4 each side.
        ("A quick-brown fox!", "the quick brown dog", 0.5),
        # LCS "the gunman" = 2; P = 2/6, R = 2/4, F = 2PR/(P+R) = 0.4.
        ("the gunman was killed by police", "police killed the gunman", 0.4),
        ("Hello, World!", "hello world", 1.0),
        ("", "hello world", 0.0),
        ("nothing shared", "hello world", 0.0),
    ],
)
def test_rouge_l_known_values(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_rouge_l_takes_the_best_reference():
    assert rouge_l("the cat sat", ["a dog ran", "the cat sat", "the cat"]) == pytest.approx(1.0)
    # Against "the cat": P = 2/3, R = 1, F = 0.8 beats "a dog ran" (0).
    assert rouge_l("the cat sat", ["a dog ran", "the cat"]) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        rouge_l("x", [])


def test_rouge_l_is_symmetric_in_f1():
    assert rouge_l("a b c d e", "a c e") == pytest.approx(rouge_l("a c e", "a b c d e"))


@pytest.fixture(scope="module")
def tiny_student(tiny_student_dir):
    return load_causal_lm(tiny_student_dir), load_tokenizer(tiny_student_dir)


def test_batched_greedy_generation_matches_one_by_one(tiny_student):
    """Left padding must not change what a prompt generates: batch of mixed lengths == each alone."""
    model, tokenizer = tiny_student
    prompts = [
        tokenizer("Name three colors.")["input_ids"],
        tokenizer("Hi")["input_ids"],
        [5, 6, 7, 8, 9, 10, 11],
    ]
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    ids = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    batched = generate_responses(model, prompts, settings, **ids)
    alone = [generate_responses(model, [p], settings, **ids)[0] for p in prompts]
    assert batched == alone
    assert all(1 <= len(r) <= 6 for r in batched)


def test_generation_cuts_after_eos(tiny_student):
    """Declaring the first greedy token an eos ends every response at its first occurrence (kept)."""
    model, tokenizer = tiny_student
    prompts = [[5, 6], [7, 8, 9], [40, 41, 42, 43]]
    settings = GenerationSettings(max_new_tokens=8, batch_size=3)
    pad = tokenizer.pad_token_id
    uncut = generate_responses(model, prompts, settings, pad_id=pad, eos_id=tokenizer.eos_token_id)
    stop = uncut[0][0]
    cut = generate_responses(model, prompts, settings, pad_id=pad, eos_id=[stop, tokenizer.eos_token_id])
    assert cut[0] == [stop]
    for full, short in zip(uncut, cut, strict=True):
        assert short == (full[: full.index(stop) + 1] if stop in full else full)


def test_sampled_rouge_is_reproducible_per_seed_and_leaves_global_rng(tiny_student, dolly_test_path):
    model, tokenizer = tiny_student
    records = load_records(dolly_test_path, "instruction").records[:4]
    examples = DistillDataset(
        records, tokenizer, "instruction", max_length=160, max_prompt_length=128
    ).examples
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, batch_size=4)
    before = torch.get_rng_state()
    first = rouge_l_of_model(model, tokenizer, examples, settings, seeds=[1, 2])
    second = rouge_l_of_model(model, tokenizer, examples, settings, seeds=[1, 2])
    assert torch.equal(before, torch.get_rng_state())
    assert first == second
    assert 0.0 <= first[0] <= 100.0 and len(first[1]) == len(examples)

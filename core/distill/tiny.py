"""Tiny random models and tokenizers for tests and smoke runs: built from a config, never downloaded.

The tokenizer is a small byte-level BPE trained on the bundled Dolly text, with bos/eos/pad/unk special
tokens and a ChatML-like chat template, so every data format (instruction, chat, text) works with it.
Models are random `LlamaForCausalLM`s with untied embeddings, saved as safetensors Hugging Face directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order

# Each turn ends with eos so that a response rendered by the data pipeline (text + eos) matches the template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_FALLBACK_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName three primary colors.\n\n### Input:\nColors mix.\n\n### Response:\n"
    "Red, yellow and blue are the three primary colors of paint. The quick brown fox jumps over the lazy "
    "dog while the cat sleeps in the warm sun, and numbers like 0 1 2 3 4 5 6 7 8 9 count things. "
)


def bundled_dolly_dir() -> Path:
    """The repository's `data/dolly` folder (it may be absent in an installed, non-editable copy)."""
    return Path(__file__).resolve().parents[2] / "data" / "dolly"


def _corpus_lines(corpus_path: Path | None) -> list[str]:
    path = corpus_path if corpus_path is not None else bundled_dolly_dir() / "train.jsonl"
    if not path.is_file():
        return [_FALLBACK_TEXT] * 4
    lines: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            lines.append(raw)
            continue
        if isinstance(record, dict):
            lines.extend(str(v) for v in record.values() if isinstance(v, str) and v)
    # The prompt template and chat markup are in every example; let BPE learn merges for them too.
    return [*lines, _FALLBACK_TEXT, "<|user|>\n<|assistant|>\n<|system|>\n"]


def make_tiny_tokenizer(
    out_dir: str | Path, *, vocab_size: int = 384, corpus_path: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer with `vocab_size` entries and save it to `out_dir`."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level BPE")
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus_lines(Path(corpus_path) if corpus_path else None), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return tokenizer


def make_tiny_model(
    out_dir: str | Path,
    *,
    vocab_size: int = 384,
    hidden_size: int = 32,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    pad_vocab_to: int | None = None,
) -> Path:
    """Save a random Llama causal LM with its tokenizer and generation config to `out_dir`; return it.

    `tokenizer` is a tokenizer object or a directory; when None a fresh tiny tokenizer of `vocab_size`
    is trained. `pad_vocab_to` makes the embedding and head larger than the tokenizer (padded vocabulary).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = make_tiny_tokenizer(out, vocab_size=vocab_size)
    elif not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer))
    model_vocab = len(tokenizer)
    if pad_vocab_to is not None:
        if pad_vocab_to < model_vocab:
            raise ValueError(f"pad_vocab_to={pad_vocab_to} is smaller than the tokenizer ({model_vocab})")
        model_vocab = pad_vocab_to
    config = LlamaConfig(
        vocab_size=model_vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private RNG stream: building a model must not shift the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_pair(
    root: str | Path, *, tokenizer: PreTrainedTokenizerBase | str | Path | None = None
) -> tuple[Path, Path]:
    """Build a teacher (4 layers, hidden 48) and a student (2 layers, hidden 32) sharing one tokenizer."""
    root = Path(root)
    if tokenizer is None:
        tokenizer = make_tiny_tokenizer(root / "tokenizer")
    teacher = make_tiny_model(root / "teacher", hidden_size=48, num_layers=4, seed=1, tokenizer=tokenizer)
    student = make_tiny_model(root / "student", hidden_size=32, num_layers=2, seed=2, tokenizer=tokenizer)
    return teacher, student

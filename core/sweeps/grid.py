"""A sweep's grid: dotted spec paths to the values tried, expanded into one child spec per point of their
cartesian product (the last key varies fastest). Pure functions; nothing here reads the database.

A path names a field of `JobSpec` (`loss.alpha`, `training.learning_rate`, `kd_ratio`) or a whole section
(`loss`). A field takes JSON scalars or lists; a section takes objects, each merged into the base spec's
section, which is how one grid holds children that differ in several fields at once, e.g. AMiD at several α
plus one forward-KL baseline: `{"loss": [{"name": "amid", "alpha": -1}, {"name": "fkl"}]}`.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from core.distill.spec import JobSpec
from core.errors import InvalidRequest, param_from_message

MAX_CHILDREN = 64


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (`LossSpec` for `loss`), None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):  # Optional[...] and the like
        section = _section_of(argument)
        if section is not None:
            return section
    return None


def _target(path: str) -> type[BaseModel] | None:
    """What `path` names in JobSpec: a section's model, or None for a field; InvalidRequest if nothing."""
    model: type[BaseModel] | None = JobSpec
    walked: list[str] = []
    for part in path.split("."):
        if model is None:
            raise InvalidRequest(
                "invalid_grid",
                f"{'.'.join(walked)!r} is a field, not a section: {path!r}",
                param=f"grid.{path}",
            )
        field = model.model_fields.get(part)
        if field is None:
            known = ", ".join(model.model_fields)
            where = f"section {'.'.join(walked)!r}" if walked else "the job spec"
            message = f"{path!r} is not a field of the job spec: {where} has no {part!r} (it has {known})"
            raise InvalidRequest("invalid_grid", message, param=f"grid.{path}")
        walked.append(part)
        model = _section_of(field.annotation)
    return model


def _json_scalar_or_list(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, list) and all(_json_scalar_or_list(item) for item in value)


def check_grid(grid: dict[str, list[Any]]) -> None:
    """Refuse a grid that is empty, too large, names no spec field, overlaps itself, or holds values that
    cannot go where its paths point (422 naming `grid.<path>`)."""
    if not grid:
        raise InvalidRequest("invalid_grid", "the grid needs at least one path", param="grid")
    size = math.prod(len(values) for values in grid.values())
    if size > MAX_CHILDREN:
        shape = " × ".join(str(len(values)) for values in grid.values())
        message = f"the grid makes {shape} = {size} jobs; a sweep holds at most {MAX_CHILDREN}"
        raise InvalidRequest("sweep_too_large", message, param="grid")
    for path, values in grid.items():
        param = f"grid.{path}"
        if not values:
            raise InvalidRequest("invalid_grid", f"{path!r} lists no values", param=param)
        for other in grid:
            if other != path and other.startswith(f"{path}."):
                message = f"{path!r} and {other!r} overlap: set {other!r} inside the objects of {path!r}"
                raise InvalidRequest("invalid_grid", message, param=param)
        section = _target(path)
        seen: set[str] = set()
        for index, value in enumerate(values):
            if section is not None and not isinstance(value, dict):
                message = f"{path!r} is a section: its values are objects of its fields, got {value!r}"
                raise InvalidRequest("invalid_grid", message, param=f"{param}.{index}")
            if section is None and not _json_scalar_or_list(value):
                message = f"{path!r} is a field: its values are JSON scalars or lists, got {value!r}"
                raise InvalidRequest("invalid_grid", message, param=f"{param}.{index}")
            key = json.dumps(value, sort_keys=True)
            if key in seen:
                raise InvalidRequest("invalid_grid", f"{path!r} repeats {value!r}", param=f"{param}.{index}")
            seen.add(key)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def with_value(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """`spec` (a JobSpec as a dict) with `path` set to `value`; an object value merges into a section."""
    result = copy.deepcopy(spec)
    *sections, last = path.split(".")
    node = result
    for part in sections:
        child = node.get(part)
        node[part] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    current = node.get(last)
    if isinstance(value, dict) and isinstance(current, dict):
        node[last] = _merge(current, value)
    else:
        node[last] = copy.deepcopy(value)
    return result


def _child_error(index: int, params: dict[str, Any], exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ()))
    message = str(first.get("msg", "invalid"))
    field = location or param_from_message(message)
    param = f"children[{index}].{field}" if field else f"children[{index}]"
    shown = json.dumps(params, sort_keys=True)
    return InvalidRequest(
        "invalid_sweep_child", f"child {index} ({shown}): {location or 'spec'}: {message}", param=param
    )


def expand(base: dict[str, Any], grid: dict[str, list[Any]]) -> list[tuple[dict[str, Any], JobSpec]]:
    """Each child's (params, validated spec) in grid order; the first invalid child is a 422 naming
    `children[<index>].<field>`."""
    check_grid(grid)
    paths = list(grid)
    children = []
    for index, values in enumerate(itertools.product(*(grid[path] for path in paths))):
        params = dict(zip(paths, values, strict=True))
        raw = base
        for path, value in params.items():
            raw = with_value(raw, path, value)
        try:
            spec = JobSpec.model_validate(raw)
        except ValidationError as exc:
            raise _child_error(index, params, exc) from exc
        children.append((params, spec))
    return children

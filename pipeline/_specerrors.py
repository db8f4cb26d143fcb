"""Spec errors as a user reads them: one line per problem, with its field path, its line in the file,
and a "did you mean" for a near miss of a key, a stage name or a kind::

    stages[1] (pretrain) > epochz (line 11): Extra inputs are not permitted; did you mean 'epochs'?
    stages[2] (probe) > init (line 13): 'pretrian' is neither an earlier stage nor ...; did you mean 'pretrain'?
    stages[1] (pretrain) > kind (line 9): unknown kind 'mea'; did you mean 'mae'? (kinds: prep, mae, ...)

Stage-graph checks (references, cycles, duplicate names) raise :class:`FieldError` with the field's
key path, so they get a line number like any other field.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

from pipeline._specfile import line_of


class FieldError(ValueError):
    """A problem at one field of the spec; ``loc`` is its key path in the document (``("stages", 2, "init")``)."""

    def __init__(self, loc: tuple, message: str) -> None:
        super().__init__(message)
        self.loc = loc


def did_you_mean(word: Any, choices: Iterable[Any]) -> str:
    """``"; did you mean 'data'?"`` for the closest of ``choices`` to ``word`` (difflib), else ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def where(lines: dict[tuple, int] | None, loc: tuple) -> str:
    """`` (line 12)``, `` (--set)`` or ``""`` for the key path ``loc``."""
    line = line_of(lines, loc) if lines else None
    return "" if line is None else " (--set)" if line == 0 else f" (line {line})"


def format_errors(exc: ValidationError, raw: Any, lines: dict[tuple, int] | None = None,
                  model: type[BaseModel] | None = None) -> str:
    """One line per problem (see the module docstring); ``model``: the spec model, for key suggestions."""
    out = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc, message = cause.loc, str(cause)
        else:
            loc, message = _data_loc(err["loc"], raw), err["msg"] + _hint(err, model)
            if err["type"] == "union_tag_invalid":
                loc = (*loc, "kind")
        out.append(f"  {_path(loc, raw)}{where(lines, loc)}: {message}")
    return "\n".join(out)


def _hint(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    """The near miss of an unknown key, kind (discriminator tag) or literal value."""
    ctx = err.get("ctx") or {}
    if err["type"] == "extra_forbidden" and model is not None and err["loc"]:
        keys = keys_at(model, err["loc"][:-1])
        return did_you_mean(err["loc"][-1], keys) if keys else ""
    if err["type"] == "union_tag_invalid":
        kinds = re.findall(r"'([^']+)'", str(ctx.get("expected_tags", "")))
        return did_you_mean(ctx.get("tag"), kinds)
    if err["type"] == "literal_error":
        return did_you_mean(err.get("input"), re.findall(r"'([^']+)'", str(ctx.get("expected", ""))))
    return ""


def keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the model accepts at pydantic's ``loc`` (discriminator tags included), [] when unknown."""
    ann: Any = model
    for part in loc:
        ann, by_tag = _unwrap(ann, part)
        if ann is None:
            return []
        if by_tag:
            continue
        if isinstance(part, int):
            ann = _item(ann)
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            field = ann.model_fields.get(part)
            ann = field.annotation if field is not None else None
        elif not isinstance(ann, type):
            return []
    ann = _unwrap(ann, None)[0]
    return list(ann.model_fields) if isinstance(ann, type) and issubclass(ann, BaseModel) else []


def _unwrap(ann: Any, tag: Any) -> tuple[Any, bool]:
    """``ann`` without ``Annotated`` / ``Optional``; a union of models resolved by the discriminator ``tag``
    (then True: ``tag`` was that union's tag, not a key)."""
    while True:
        origin = typing.get_origin(ann)
        if origin is typing.Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(ann) if a is not type(None)]
            tagged = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)
                      and "kind" in m.model_fields and m.model_fields["kind"].default == tag]
            if tagged:
                return tagged[0], True
            if len(members) != 1:
                return ann, False
            ann = members[0]
        else:
            return ann, False


def _item(ann: Any) -> Any:
    args = typing.get_args(ann)
    return args[0] if typing.get_origin(ann) in (list, tuple) and args else None


def _data_loc(loc: tuple, raw: Any) -> tuple:
    """``loc`` without the discriminator tags pydantic inserts (``stages, 1, mae, epochs`` -> ``stages, 1, epochs``)."""
    out: list[Any] = []
    node = raw
    for i, key in enumerate(loc):
        if i > 0 and isinstance(loc[i - 1], int) and isinstance(node, dict) and node.get("kind") == key:
            continue
        out.append(key)
        if isinstance(key, int):
            node = node[key] if isinstance(node, list) and key < len(node) else None
        else:
            node = node.get(key) if isinstance(node, dict) else None
    return tuple(out)


def _path(loc: tuple, raw: Any) -> str:
    """``stages[1] (pretrain) > model > img_siz`` for the key path ``loc`` (tags already removed)."""
    parts: list[str] = []
    node = raw
    for key in loc:
        if isinstance(key, int):
            item = node[key] if isinstance(node, list) and -len(node) <= key < len(node) else None
            name = item.get("name") if isinstance(item, dict) else None
            parts[-1:] = [f"{parts[-1] if parts else ''}[{key}]" + (f" ({name})" if name else "")]
            node = item
            continue
        parts.append(str(key))
        node = node.get(key) if isinstance(node, dict) else None
    return " > ".join(parts) or "(spec)"

"""Reading a spec file: YAML with the line of every key, and ``--set`` overrides.

    raw, lines = read_yaml("configs/demo.yaml")      # lines[("stages", 1, "epochs")] == 14
    raw = apply_overrides(raw, ["stages.pretrain.epochs=2"])

An override is ``dotted.path=value``: the value is parsed as YAML (``2`` is an int, ``[a, b]`` a
list, ``null`` None), and under ``stages`` the next part names a stage by its ``name`` (or its
index). Intermediate mappings are created as needed; the spec's strict validation then refuses
any key that does not exist, naming its path.
"""

from __future__ import annotations

import difflib
import io
from typing import Any, Sequence

import yaml


class SpecError(ValueError):
    """The spec is invalid; the message lists every problem with its field path (re-exported by
    :mod:`pipeline.spec`, where callers import it)."""


def read_yaml(path: str) -> tuple[Any, dict[tuple, int]]:
    """The document at ``path`` and ``{key path: 1-based line}`` for every mapping key and list item."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise SpecError(f"run spec {path} does not exist") from None
    except OSError as exc:
        raise SpecError(f"cannot read run spec {path}: {exc}") from None
    try:
        raw = unshared(yaml.safe_load(_named(text, path)))
        lines: dict[tuple, int] = {}
        node = yaml.compose(_named(text, path), Loader=yaml.SafeLoader)
        if node is not None:
            _walk(node, (), lines)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from None
    return raw, lines


def unshared(node: Any) -> Any:
    """``node`` rebuilt with no object reachable twice.

    YAML aliases (``*finetune``) and merge keys (``<<: *finetune``) hand back the *same* nested dict or
    list at every place they are used, and :func:`copy.deepcopy` keeps that sharing; a ``--set`` on one
    stage would then change every stage that took the anchor.
    """
    if isinstance(node, dict):
        return {key: unshared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [unshared(value) for value in node]
    return node


def _named(text: str, path: str) -> io.StringIO:
    """``text`` as a stream named ``path``: YAML's error marks then name the file, not ``<unicode string>``."""
    stream = io.StringIO(text)
    stream.name = path
    return stream


def _walk(node: yaml.Node, path: tuple, lines: dict[tuple, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, key.value)
            lines[sub] = key.start_mark.line + 1
            _walk(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines)


def line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The line of the longest prefix of ``loc`` present in the file (None when none is; 0: a ``--set``)."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def apply_overrides(raw: Any, overrides: Sequence[str], source: str = "the spec",
                    lines: dict[tuple, int] | None = None) -> Any:
    """A copy of ``raw`` with every ``path=value`` of ``overrides`` set (see the module docstring).

    Each overridden key path is marked in ``lines`` with line 0 (errors then say ``--set``).
    """
    if not overrides:
        return raw
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    out = unshared(raw)
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            raise SpecError(f"--set {item!r}: expected PATH=VALUE, e.g. stages.pretrain.epochs=2")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"--set {path}: the value {text!r} is not valid YAML: {exc}") from None
        loc = _set(out, path.strip().split("."), value, path.strip())
        if lines is not None:
            lines.update({k: 0 for k in list(lines) if k[:len(loc)] == loc})
            lines[loc] = 0
    return out


def _set(node: Any, parts: list[str], value: Any, path: str) -> tuple:
    """Set ``value`` at ``parts``; returns the key path it took (stage names resolved to indices)."""
    loc: list[Any] = []
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            loc.append(_index(node, part, path, where))
            node = node[loc[-1]]
            continue
        loc.append(part)
        if isinstance(node, dict):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, (dict, list)):
                raise SpecError(f"--set {path}: {where} is a {type(child).__name__} ({child!r}), not a mapping")
            node = child
        else:
            raise SpecError(f"--set {path}: {where} is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        loc.append(_index(node, last, path, ".".join(parts)))
    else:
        loc.append(last)
    node[loc[-1]] = value
    return tuple(loc)


def _index(items: list, part: str, path: str, where: str) -> int:
    """A list position: an integer, or the position of the item whose ``name`` is ``part`` (stages)."""
    names = [it.get("name") for it in items if isinstance(it, dict)]
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    if part.lstrip("-").isdigit() and -len(items) <= int(part) < len(items):
        return int(part)
    close = difflib.get_close_matches(part, [str(n) for n in names], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise SpecError(f"--set {path}: {where}: no stage named {part!r}{hint} (stages: {', '.join(map(str, names))})")

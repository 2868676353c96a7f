"""Every config key with its value, type and one-line doc, for ``raytrain-speech config show``.

The docs are the attribute docstrings the config dataclasses already carry (the string literal after
each field), read from the class's source with ``ast``: one place to write a key's meaning, shown in
the code, in ``config show`` and nowhere else to fall out of date. Works for any dataclass, so the
model families' architecture configs (under ``models/``) are shown the same way.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from raytrain_speech.config.schema import to_dict


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key: dotted name, value, type as written in the annotation, first line of its doc."""

    key: str
    value: Any
    type_name: str
    doc: str


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring (whitespace collapsed); fields without one are absent."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): types and values are still shown
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.\s+(?=[A-Z`(\[])")


def first_sentence(doc: str) -> str:
    """Up to the first full stop that ends a sentence (not "e.g. x"): the one-line doc."""
    m = _SENTENCE_END.search(doc)
    return doc if m is None else doc[:m.start() + 1]


def _type_name(tp: Any) -> str:
    name = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else None
    return name or str(tp).replace("typing.", "").replace("NoneType", "None")


def key_docs(obj: Any, prefix: str = "") -> list[KeyDoc]:
    """Every leaf field of dataclass ``obj`` (nested dataclasses flattened with dotted names)."""
    hints = typing.get_type_hints(type(obj))
    docs = field_docs(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(key_docs(value, f"{prefix}{f.name}."))
        else:
            out.append(KeyDoc(f"{prefix}{f.name}", value, _type_name(hints[f.name]), docs.get(f.name, "")))
    return out


def _flow(value: Any) -> str:
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()  # a scalar's document ends with "..."


def render_yaml(rows: list[KeyDoc]) -> str:
    """Rows as YAML a recipe can start from: sections nest, each value carries ``# type: doc``."""
    lines: list[str] = []
    open_path: list[str] = []
    flows = [_flow(r.value) for r in rows]
    width = max((len(r.key.split(".")[-1]) + 2 * r.key.count(".") + len(f) for r, f in zip(rows, flows)), default=0)
    for r, flow in zip(rows, flows):
        *path, leaf = r.key.split(".")
        common = 0
        while common < min(len(path), len(open_path)) and path[common] == open_path[common]:
            common += 1
        for depth in range(common, len(path)):
            lines.append(f"{'  ' * depth}{path[depth]}:")
        open_path = path
        item = f"{'  ' * len(path)}{leaf}: {flow}"
        comment = f"{r.type_name}" + (f": {first_sentence(r.doc)}" if r.doc else "")
        lines.append(f"{item.ljust(min(width + 2, 60))}  # {comment}")
    return "\n".join(lines) + "\n"


def show_config(cfg: Any, family_config: Any, recipe: str | None, overrides: list[str]) -> str:
    """``config show``: every key of ``cfg`` as commented YAML, the model family's resolved
    architecture (``family_config``, from models.registry) standing where ``model.overrides`` is."""
    rows = []
    for row in key_docs(cfg):
        rows.extend(key_docs(family_config, "model.overrides.") if row.key == "model.overrides" else [row])
    given = f" with {' '.join(overrides)}" if overrides else ""
    return (f"# resolved config of {recipe or 'the defaults'}{given}; set any key as key=value "
            f"(e.g. train.max_steps=50), or start a recipe from this file\n" + render_yaml(rows))

"""Walk a parsed YAML document against a tree of known field names (for schemas we cannot load here).

A spec is a dict (a mapping with exactly these keys allowed, each with its own spec), a one-element
list (a list whose items follow that spec), a type (the value must be an instance) or None (anything).
"""

from __future__ import annotations


def check_fields(value, spec, where: str, known_as: str) -> None:
    if isinstance(spec, dict):
        assert isinstance(value, dict), f"{where}: expected a mapping"
        for key, item in value.items():
            assert key in spec, f"{where}.{key}: not a {known_as} field (known: {sorted(spec)})"
            check_fields(item, spec[key], f"{where}.{key}", known_as)
    elif isinstance(spec, list):
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            check_fields(item, spec[0], f"{where}[{i}]", known_as)
    elif spec is not None:
        assert isinstance(value, spec), f"{where}: expected {spec.__name__}, got {value!r}"

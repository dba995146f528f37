"""row.yaml's text for many rows: the same bytes as one `yaml.dump` per row, in a fraction
of the time.

PyYAML builds a node for every value in Python before libyaml emits them (~2.5 ms per row:
23 s of a 10,000-row launch). The rows of a grid share most of their values, and a block
mapping's entries are emitted one after the other, each from its own key, value and depth
alone. So each entry (under `config` and one section below it) is dumped once per distinct
value and reused; ints, booleans and null are written as PyYAML writes them. Any entry whose
key would not be written plain is dumped whole; tests/unit/test_bench.py compares the text
with `yaml.dump` over the paper grids' rows and fuzzed ones.

The trees are `Row.to_dict()`'s: fresh containers of YAML's plain types (so no YAML aliases,
which would span entries), whose repr tells apart values that dump apart.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's emitter when PyYAML has it
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DEPTH = 2  # entries are reused down to a section's fields (`config.train.seed`)


def dump(data: Any) -> str:
    """`yaml.dump` as row.yaml has always been written."""
    return yaml.dump(data, Dumper=DUMPER, sort_keys=False)


def dump_cached(data: Any, cache: dict) -> str:
    """`dump(data)` of a row's mapping, reusing the entries `cache` holds (one dict for the
    rows of a launch)."""
    if type(data) is not dict or not data:
        return dump(data)
    return "".join(_entry((), key, value, cache) for key, value in data.items())


def _entry(path: tuple[str, ...], key: Any, value: Any, cache: dict) -> str:
    indent = "  " * len(path)
    split = type(value) is dict and value and len(path) < _DEPTH and _plain_key(key, cache)
    if split and not path:  # `config`: differs in every row (its id): only its parts are reused
        return f"{key}:\n" + "".join(_entry((key,), k, v, cache) for k, v in value.items())
    memo = (path, key, type(value), repr(value))
    text = cache.get(memo)
    if text is None:
        if split:  # a section: its fields, each reused
            text = f"{indent}{key}:\n" + "".join(
                _entry((*path, key), k, v, cache) for k, v in value.items()
            )
        else:
            text = _scalar(indent, key, value, cache) or _lone(path, key, value)
        cache[memo] = text
    return text


def _scalar(indent: str, key: Any, value: Any, cache: dict) -> str | None:
    """An int, boolean or null entry as SafeRepresenter and libyaml write it, or None."""
    kind = type(value)
    if kind is bool:
        text = "true" if value else "false"
    elif kind is int:
        text = str(value)
    elif value is None:
        text = "null"
    else:
        return None
    return f"{indent}{key}: {text}\n" if _plain_key(key, cache) else None


def _lone(path: tuple[str, ...], key: Any, value: Any) -> str:
    """One entry dumped inside the mappings of its path, their key lines cut off."""
    doc: dict[Any, Any] = {key: value}
    for name in reversed(path):
        doc = {name: doc}
    text = dump(doc)
    head = "".join(f"{'  ' * i}{name}:\n" for i, name in enumerate(path))
    if not text.startswith(head):  # cannot happen: the path's keys were checked plain
        raise ValueError(f"row.yaml: unexpected text for {'.'.join(path)}: {text[:200]!r}")
    return text[len(head) :]


def _plain_key(key: Any, cache: dict) -> bool:
    """Whether `key` is written as itself (`key: ...`): a name that YAML reads as text."""
    memo = ("plain key", key)
    if memo not in cache:
        cache[memo] = (
            type(key) is str and bool(_NAME.match(key)) and dump({key: 0}) == f"{key}: 0\n"
        )
    return cache[memo]

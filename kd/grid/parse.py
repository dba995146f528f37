"""Reading a grid file and the command line's overrides: YAML with OmegaConf's number rules,
duplicate keys and syntax errors reported with their line, overrides in Hydra's own grammar."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kd.grid.rows import GridError


def _grid_loader(base: type) -> type:
    """`base` (a PyYAML safe loader) with OmegaConf's YAML 1.2 number rules and duplicate-key
    checks.

    Plain PyYAML (YAML 1.1) reads `lr: 1e-4` as the *string* '1e-4' and keeps the last of two
    equal keys silently; OmegaConf's own loader does neither, and grids are OmegaConf files.
    Duplicate keys are collected (with their line) so that all of them are reported at once.
    """

    class Loader(base):  # type: ignore[misc,valid-type]
        duplicates: list[tuple[int, str]]

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag != yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG:
                    continue
                if key_node.value in seen:
                    mark = key_node.start_mark
                    self.duplicates.append(
                        (
                            mark.line + 1,
                            f"{mark.line + 1}:{mark.column + 1}: duplicate key "
                            f"'{key_node.value}' (a later value would silently replace the "
                            "earlier one); keep one",
                        )
                    )
                seen.add(key_node.value)
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:
             [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
            |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in Loader.yaml_implicit_resolvers.items()
    }
    return Loader


# PyYAML's Python parser, not libyaml's: BoundedLoader's depth bound and the exact errors of a
# bad file (a control character's line) need the parser's Python hooks, and grid files are short.
GridLoader = _grid_loader(yaml.SafeLoader)


# Bounds on what a grid file may be: grids are short hand-written files, and these keep a
# wrong path (a dataset archive, /dev/zero), a deeply nested or an alias-bomb YAML from
# exhausting memory or Python's stack before any problem could be reported.
MAX_GRID_BYTES = 4 * 2**20
MAX_DEPTH = 50
MAX_NODES = 200_000  # values in the file once YAML aliases (`*name`) are expanded
PLAIN_TAGS = {
    f"tag:yaml.org,2002:{name}"
    for name in ("str", "int", "float", "bool", "null", "seq", "map", "merge")
}
MAX_REPORTED = 10


def read_grid_text(path: Path) -> str:
    """The grid file's text: at most MAX_GRID_BYTES, UTF-8, or a GridError that says which."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_GRID_BYTES + 1)
    except OSError as exc:
        raise GridError(
            [f"{path}: cannot read the grid file: {exc.strerror or exc}; check the path"]
        ) from None
    except ValueError as exc:  # e.g. an embedded NUL in the path
        raise GridError([f"{path!r}: not a usable file name ({exc}); check the path"]) from None
    if len(data) > MAX_GRID_BYTES:
        raise GridError(
            [
                f"{path}: larger than {MAX_GRID_BYTES // 2**20} MiB, so not a grid file (a grid "
                "is a short YAML file); check the path"
            ]
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise GridError(
            [
                f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                f"{exc.start}): is it a grid file? If so, save it as UTF-8"
            ]
        ) from None


class BoundedLoader(GridLoader):  # type: ignore[misc,valid-type]
    """The grid loader that refuses documents nested deeper than MAX_DEPTH while composing them
    (PyYAML composes recursively: a deeper file would end in a RecursionError)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def node_problems(root: yaml.Node) -> list[str]:
    """What a composed grid file holds that a grid cannot: keys that are not names, values of
    other types than text, numbers, booleans, null, lists and mappings (`!!binary`, `!!set`,
    ...), an alias that contains itself, more than MAX_NODES values once aliases are
    expanded (a "billion laughs" file). Each as 'LINE:COLUMN: problem'."""
    problems: list[str] = []
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def where(node: yaml.Node) -> str:
        return f"{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            problems.append(f"{where(node)}: an alias (*name) refers to a value that contains it")
            return MAX_NODES + 1
        open_nodes.add(id(node))
        total = 1
        if node.tag not in PLAIN_TAGS:
            problems.append(
                f"{where(node)}: a value tagged '{node.tag}'; a grid holds only text, numbers, "
                "booleans, null, lists and mappings"
            )
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag not in (
                    "tag:yaml.org,2002:str",
                    "tag:yaml.org,2002:merge",
                ):
                    shown = key.value if isinstance(key, yaml.ScalarNode) else "a list or mapping"
                    problems.append(
                        f"{where(key)}: key {shown!r} is not a name; write keys as plain text "
                        "(quote a number: '1': ...)"
                    )
                total += size(key) + size(value)
        open_nodes.discard(id(node))
        sizes[id(node)] = min(total, MAX_NODES + 1)
        return sizes[id(node)]

    if size(root) > MAX_NODES and not problems:
        problems.append(
            f"1:1: more than {MAX_NODES} values once its aliases (*name) are expanded; a grid "
            "is a short file: write rows out or use `recipes`/`axes`"
        )
    return problems


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a grid file safely; a syntax error names the line, and so does a duplicate key.
    Any bytes give either the file's mapping or a GridError (never another exception)."""
    text = read_grid_text(path)
    try:
        loader = BoundedLoader(text)
    except yaml.reader.ReaderError as exc:  # a control character where YAML allows none
        line = text[: exc.position].count("\n") + 1
        raise GridError(
            [
                f"{path}:{line}: character #x{exc.character:04x} is not allowed in YAML "
                "(is it a grid file?); remove it"
            ]
        ) from None
    loader.duplicates = []
    try:
        node = loader.get_single_node()  # safe: no Python objects from YAML
        problems = node_problems(node) if node is not None else []
        if problems:
            raise GridError([f"{path}:{p}" for p in problems[:MAX_REPORTED]])
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise GridError([f"{where}: YAML syntax error: {problem}; fix the YAML there"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise GridError([f"{path}:{message}" for _, message in sorted(loader.duplicates)])
    if data is None:
        raise GridError([f"{path}: the grid file is empty; write `name`, `defaults`, `rows`"])
    if not isinstance(data, dict):
        raise GridError(
            [f"{path}: a grid file must be a YAML mapping with `name`, `defaults`, `rows`"]
        )
    return data


def parse_overrides(overrides: Sequence[str], file: str) -> list[Any]:
    """Parse CLI overrides with Hydra's own grammar (`a.b=1`, `+a=1`, `++a=1`, `~a`, `a=1,2`)."""
    if not overrides:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed, problems = [], []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as exc:
            first = str(exc).splitlines()[0]
            problems.append(
                f"{file}: override '{text}': {first}; write key=value, +key=value (add), "
                "++key=value (add or set), ~key (remove) or key=a,b (a sweep), quoting values "
                "with spaces or brackets"
            )
            continue
        if not override.key_or_group:  # Hydra's grammar lets `=3` through with an empty key
            problems.append(f"{file}: override '{text}': no key before '='; write key=value")
            continue
        parsed.append(override)
    if problems:
        raise GridError(problems)
    return parsed

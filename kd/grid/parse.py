"""Reading a grid file and the command line's overrides: YAML with OmegaConf's number rules,
duplicate keys and syntax errors reported with their line, overrides in Hydra's own grammar."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kd.grid.rows import GridError

# libyaml's parser when PyYAML has it (a 10,000-value axis: 0.2 s instead of 1.5 s); the
# constructor and resolvers below are Python either way.
_SAFE_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class GridLoader(_SAFE_LOADER):  # type: ignore[misc,valid-type]
    """PyYAML's safe loader with OmegaConf's YAML 1.2 number rules and duplicate-key checks.

    Plain PyYAML (YAML 1.1) reads `lr: 1e-4` as the *string* '1e-4' and keeps the last of two
    equal keys silently; OmegaConf's own loader does neither, and grids are OmegaConf files.
    Duplicate keys are collected (with their line) so that all of them are reported at once.
    """

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
                        f"{mark.line + 1}:{mark.column + 1}: duplicate key '{key_node.value}' "
                        "(a later value would silently replace the earlier one); keep one",
                    )
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


GridLoader.add_implicit_resolver(
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
GridLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in GridLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a grid file safely; a syntax error names the line, and so does a duplicate key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise GridError(
            [f"{path}: cannot read the grid file: {exc.strerror}; check the path"]
        ) from None
    loader = GridLoader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()  # safe: no Python objects from YAML
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise GridError([f"{where}: YAML syntax error: {problem}; fix the YAML there"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise GridError([f"{path}:{message}" for _, message in sorted(loader.duplicates)])
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

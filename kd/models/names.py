"""Model names: timm architectures with optional pretrained tags, their checks, and the tiny
same-family stand-ins used by --smoke. Reading names needs no torch; listing what timm knows
imports timm, so only the checks that need it do, and only once per installed timm: the lists
are cached (kd/models/name_cache.py), so `--dry-run` checks names without importing torch."""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping

SOURCES = ("scratch", "pretrained", "file", "row")


class ModelLoadError(ValueError):
    """A model or its weights cannot be built/loaded; the message says which row, file and keys."""


SMOKE_BIT = "resnetv2_18x1_bit_smoke"  # registered by kd.models.smoke_bit
SMALL_IMAGE_MODELS = (
    "small_cnn",
    "small_cnn_wide",
    "small_deit_distilled",
    "small_deit_p7_distilled",
)  # kd.models.small_image
# The models kdgrid registers with timm itself: known whether or not timm's list (or its name
# cache, written by another process that may not have imported them) has them.
KDGRID_MODELS = (SMOKE_BIT, *SMALL_IMAGE_MODELS)


# Names
# --------------------------------------------------------------------------------------------


@functools.cache
def _registry() -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """Every architecture timm knows and each one's pretrained tags: from the name cache of the
    installed timm when there is one, else listed by timm (imported: ~2-5 s) and cached."""
    from kd.models.name_cache import read_names, write_names

    cached = read_names()
    if cached is not None:
        return tuple(dict.fromkeys([*cached[0], *KDGRID_MODELS])), cached[1]
    import timm  # the one heavy import of this module: only name checks need it

    tags: dict[str, list[str]] = defaultdict(list)
    for full in timm.list_pretrained():
        arch, _, tag = full.partition(".")
        if tag:
            tags[arch].append(tag)
    models = tuple(dict.fromkeys([*timm.list_models(), *KDGRID_MODELS]))
    listed = (models, {arch: tuple(t) for arch, t in tags.items()})
    write_names(*listed)
    return listed


def _model_names() -> tuple[str, ...]:
    return _registry()[0]


@functools.cache
def _model_name_set() -> frozenset[str]:
    return frozenset(_model_names())


def pretrained_tags() -> Mapping[str, tuple[str, ...]]:
    """Architecture -> its pretrained tags (what ``timm.list_pretrained()`` lists)."""
    return _registry()[1]


def split_tag(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def _quoted_list(names: Iterable[str]) -> str:
    items = [f"'{n}'" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def check_model_name(name: str) -> str | None:
    """None when timm knows ``name`` (``arch`` or ``arch.tag``), else a message with suggestions."""
    arch, tag = split_tag(name)
    if arch not in _model_name_set():
        close = difflib.get_close_matches(arch, _model_names(), n=3, cutoff=0.6)
        hint = f"; did you mean {_quoted_list(close)}?" if close else ""
        return f"unknown timm model '{arch}'{hint} (see timm.list_models())"
    if tag is None:
        return None
    valid = pretrained_tags().get(arch, ())
    if tag in valid:
        return None
    if not valid:
        return f"unknown pretrained tag '{tag}' for '{arch}': timm has no pretrained weights for it"
    close = difflib.get_close_matches(tag, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (
        f"unknown pretrained tag '{tag}' for '{arch}'{hint} "
        f"(valid tags: {', '.join(valid)}; see timm.list_pretrained('{arch}*'))"
    )


# --------------------------------------------------------------------------------------------
# Smoke stand-ins
# --------------------------------------------------------------------------------------------

#: Family pattern (fnmatch, checked in order, first match wins) -> tiny model of the same family,
#: built from scratch, so a grid can be smoke-run on CPU with the real code paths: the distillation
#: token of DeiT, ConvNeXt's LayerNorm head, BiT's GroupNorm/StdConv, ResNet's BatchNorm.
SMOKE_MODELS: dict[str, str] = {
    "deit*distilled*": "deit_tiny_distilled_patch16_224",
    "deit*": "deit_tiny_patch16_224",
    "vit_*": "vit_tiny_patch16_224",
    "convnextv2*": "convnextv2_atto",
    "convnext*": "convnext_atto",
    "resnetv2*": SMOKE_BIT,
    "resnet*": "resnet18",
}


def smoke_model_name(name: str) -> str:
    """The tiny same-family stand-in for ``name`` (pretrained tag stripped); other names unchanged."""
    arch, _ = split_tag(name)
    for pattern, tiny in SMOKE_MODELS.items():
        if fnmatch.fnmatchcase(arch, pattern):
            return tiny
    return arch


# --------------------------------------------------------------------------------------------
# Model introspection
# --------------------------------------------------------------------------------------------

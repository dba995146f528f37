"""timm models for KD rows: names, tiny smoke stand-ins, building, checkpoint loading, embeddings.

A row names a timm architecture (optionally with a pretrained tag) and where its weights come from:

- ``scratch``: random init;
- ``pretrained``: timm's own pretrained weights for the tag (timm replaces the head and resamples
  ViT position embeddings itself);
- ``file``: a local checkpoint (timm/DeiT ``{"model": ...}``, ``{"state_dict": ...}``, EMA, a plain
  state dict or ``.safetensors``); the ImageNet head is dropped when the class count differs;
- ``row``: another row's checkpoint written by this project; the head must match exactly.

Everything that does not fit is reported at once, naming the row, the file and the keys, so a bad
grid fails before the cluster spends hours on it.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import math
import pickle
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import timm
import torch
from timm.layers import GroupNormAct, StdConv2d, resample_abs_pos_embed
from timm.models import build_model_with_cfg, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnetv2 import ResNetV2
from torch import nn

__all__ = [
    "SMOKE_MODELS",
    "ModelLoadError",
    "ModelOutputs",
    "build_model",
    "check_checkpoint",
    "check_model_name",
    "count_params",
    "data_config",
    "embedding_dim",
    "forward_with_embedding",
    "freeze_teacher",
    "is_distilled",
    "load_state_file",
    "smoke_model_name",
    "unwrap_model",
]

SOURCES = ("scratch", "pretrained", "file", "row")

# timm modules whose models take ``img_size`` (fixed-size position embeddings); CNNs do not need it.
_IMG_SIZE_MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid", "eva", "beit")

# Prefixes added by wrappers around a model when it is saved: DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Keys under which training scripts store the weights, in order of preference. EMA weights are used
# only when the file holds no plain model weights (an EMA-only export).
_STATE_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema")


class ModelLoadError(ValueError):
    """A model or its weights cannot be built/loaded; the message says which row, file and keys."""


# --------------------------------------------------------------------------------------------
# A tiny BiT for smoke runs. timm's smallest ResNetV2 with GroupNorm + weight-standardised convs
# (what BiT is) is resnetv2_50x1_bit (23.5M params, ~5x slower than resnet18 on CPU); resnetv2_18
# is small but uses BatchNorm and plain convs, so BiT-specific behaviour (GroupNorm with tiny
# batches, StdConv) would go untested. This registers resnetv2_18's layout with BiT's layers.
# --------------------------------------------------------------------------------------------

SMOKE_BIT = "resnetv2_18x1_bit_smoke"

_SMOKE_BIT_CFG = {
    "architecture": SMOKE_BIT,
    "num_classes": 1000,
    "input_size": (3, 224, 224),
    "pool_size": (7, 7),
    "crop_pct": 0.875,
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),  # BiT normalisation, as timm's resnetv2_*_bit
    "std": (0.5, 0.5, 0.5),
    "first_conv": "stem.conv",
    "classifier": "head.fc",
}


@register_model
def resnetv2_18x1_bit_smoke(pretrained: bool = False, **kwargs: Any) -> ResNetV2:
    """ResNetV2-18 with BiT's GroupNorm + StdConv and fixed stem; smoke tests only (no weights)."""
    if pretrained:
        raise ModelLoadError(f"'{SMOKE_BIT}' is a smoke-test model and has no pretrained weights")
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or dict(_SMOKE_BIT_CFG)
    args = dict(
        layers=[2, 2, 2, 2],
        channels=(64, 128, 256, 512),
        basic=True,
        bottle_ratio=1.0,
        stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
        norm_layer=GroupNormAct,
    )
    return build_model_with_cfg(
        ResNetV2, SMOKE_BIT, False, feature_cfg=dict(flatten_sequential=True), **{**args, **kwargs}
    )


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


@functools.cache
def _model_names() -> tuple[str, ...]:
    """All architecture names timm knows (cached: listing takes ~10 ms, checks run per row)."""
    return tuple(timm.list_models())


@functools.cache
def _model_name_set() -> frozenset[str]:
    return frozenset(_model_names())


@functools.cache
def _pretrained_tags() -> Mapping[str, tuple[str, ...]]:
    """Architecture -> its pretrained tags, built once from ``timm.list_pretrained()``."""
    tags: dict[str, list[str]] = defaultdict(list)
    for full in timm.list_pretrained():
        arch, _, tag = full.partition(".")
        if tag:
            tags[arch].append(tag)
    return {arch: tuple(t) for arch, t in tags.items()}


def _split_tag(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def _quoted_list(names: Iterable[str]) -> str:
    items = [f"'{n}'" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def check_model_name(name: str) -> str | None:
    """None when timm knows ``name`` (``arch`` or ``arch.tag``), else a message with suggestions."""
    arch, tag = _split_tag(name)
    if arch not in _model_name_set():
        close = difflib.get_close_matches(arch, _model_names(), n=3, cutoff=0.6)
        hint = f"; did you mean {_quoted_list(close)}?" if close else ""
        return f"unknown timm model '{arch}'{hint} (see timm.list_models())"
    if tag is None:
        return None
    valid = _pretrained_tags().get(arch, ())
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
    arch, _ = _split_tag(name)
    for pattern, tiny in SMOKE_MODELS.items():
        if fnmatch.fnmatchcase(arch, pattern):
            return tiny
    return arch


# --------------------------------------------------------------------------------------------
# Model introspection
# --------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The timm model inside DDP / torch.compile wrappers (their attributes live on the inner one)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def is_distilled(model: nn.Module) -> bool:
    """True for a DeiT with a distillation token and head (two classifier outputs in training)."""
    return isinstance(unwrap_model(model), VisionTransformerDistilled)


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those that require grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def freeze_teacher(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode with no gradients, so KD never updates or perturbs it.

    Run its forward passes under ``torch.inference_mode()`` (the caller's job: this only sets
    state). A later ``.train()`` on a parent module would undo ``eval()``, so keep the teacher
    outside the student's module tree.
    """
    model.eval()
    model.requires_grad_(False)
    return model


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s) from timm's pretrained_cfg (a tuple for DeiT-dist)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def data_config(model: nn.Module) -> dict[str, Any]:
    """Input size and normalisation the model expects (teacher and student may differ).

    timm's ``resolve_data_config`` reads the pretrained cfg, which keeps the default input size;
    for fixed-size models (ViT/DeiT) built with another ``img_size`` the real size is used.
    """
    inner = unwrap_model(model)
    cfg = timm.data.resolve_data_config({}, model=inner)
    img_size = getattr(getattr(inner, "patch_embed", None), "img_size", None)
    if img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], *img_size)
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    return {k: cfg[k] for k in keys if k in cfg}


# --------------------------------------------------------------------------------------------
# Forward with embeddings
# --------------------------------------------------------------------------------------------


class ModelOutputs(NamedTuple):
    """One forward pass of a classifier, with what the KD terms need."""

    logits: torch.Tensor  # class head (distilled DeiT in training: the cls-token head)
    dist_logits: torch.Tensor  # distillation head in training, else the same as logits
    embedding: torch.Tensor  # pooled pre-logit features [B, D] (or the pooled feature_layer)


def _pool(output: Any, num_prefix_tokens: int) -> torch.Tensor:
    """Global-average-pool a layer output: NCHW maps over H, W; ViT tokens over patch tokens."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    if output.ndim == 3:
        return output[:, num_prefix_tokens:].mean(dim=1)
    return output.flatten(1)


def _find_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    examples = close or [n for n, _ in model.named_children()][:10]
    raise ValueError(
        f"unknown feature_layer '{name}' for {type(model).__name__}; "
        f"valid names include: {', '.join(examples)} (see model.named_modules())"
    )


def _classifier_modules(model: nn.Module) -> list[nn.Module]:
    heads = model.get_classifier()
    return list(heads) if isinstance(heads, (tuple, list)) else [heads]


def forward_with_embedding(
    model: nn.Module, x: torch.Tensor, *, feature_layer: str | None = None
) -> ModelOutputs:
    """Logits and embedding from one forward pass, identical to ``model(x)``.

    The pass goes through ``model(x)`` itself, so DDP/Accelerate wrappers still synchronise
    gradients; hooks on the timm model inside capture the classifier input (timm's pre-logits:
    what ``forward_head(..., pre_logits=True)`` returns; for a distilled DeiT the mean of the two
    tokens) or, with ``feature_layer``, the output of that submodule, average-pooled.
    A distilled DeiT returns both heads in training when timm's distilled training is on (as
    ``build_model`` leaves it; ``set_distilled_training(False)`` trains the mean of the heads) and
    their mean in eval; whenever the model gives one output, ``dist_logits`` equals ``logits``.
    """
    inner = unwrap_model(model)
    captured: list[torch.Tensor] = []
    if feature_layer is None:
        hooks = [
            head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1)))
            for head in _classifier_modules(inner)
        ]
    else:
        prefix = getattr(inner, "num_prefix_tokens", 0)
        layer = _find_layer(inner, feature_layer)
        hooks = [
            layer.register_forward_hook(lambda _m, _a, out: captured.append(_pool(out, prefix)))
        ]
    try:
        out = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    logits, dist_logits = out if isinstance(out, (tuple, list)) else (out, out)
    embedding = captured[0] if len(captured) == 1 else sum(captured) / len(captured)
    return ModelOutputs(logits, dist_logits, embedding)


def _probe_size(model: nn.Module) -> tuple[int, int, int]:
    """Input for a shape probe: a fixed-size model's own size, else a cheap 64 px image."""
    chans, height, width = data_config(model)["input_size"]
    if getattr(getattr(model, "patch_embed", None), "img_size", None) is not None:
        return chans, height, width
    return chans, min(height, 64), min(width, 64)


def embedding_dim(model: nn.Module, *, feature_layer: str | None = None) -> int:
    """Width of ``forward_with_embedding(...).embedding``: timm's pre-logits size, else measured."""
    inner = unwrap_model(model)
    if feature_layer is None:
        dim = getattr(inner, "head_hidden_size", None) or getattr(inner, "num_features", None)
        if dim:
            return int(dim)
    param = next(inner.parameters())
    x = torch.zeros(2, *_probe_size(inner), device=param.device, dtype=param.dtype)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            out = forward_with_embedding(inner, x, feature_layer=feature_layer)
    finally:
        inner.train(was_training)
    return int(out.embedding.shape[1])


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


def torch_load(path: Path, *, trusted: bool, mmap: bool = False) -> Any:
    """torch.load with weights_only=True; a trusted file with extra objects falls back to pickle.

    `mmap` maps the tensors instead of reading them (a check that only needs names and shapes);
    files in torch's legacy (non-zip) format cannot be mapped and are read instead.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap can only be used" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise
        if not trusted:
            raise ModelLoadError(
                f"checkpoint {path} contains pickled Python objects besides tensors and was "
                "refused (torch.load weights_only=True: unpickling could run arbitrary code). "
                "Re-save only the state dict (torch.save({'model': model.state_dict()}, ...)) "
                "or convert it to .safetensors"
            ) from exc
    return torch.load(path, map_location="cpu", weights_only=False)


def _select_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The weights inside a loaded checkpoint, whatever wrapper dict the training script used."""
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state dict; "
            "save model.state_dict(), not the model object"
        )
    for key in _STATE_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelLoadError(
            f"checkpoint {path} has no state dict: expected tensors or one of the keys "
            f"{', '.join(_STATE_KEYS)}; found keys {sorted(map(str, obj))[:10]}"
        )
    return dict(obj)


def _strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes, in any order."""
    clean = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def load_state_file(
    path: str | Path, *, trusted: bool = False, mmap: bool = False
) -> dict[str, torch.Tensor]:
    """A checkpoint file's weights as a clean state dict (``.safetensors`` or torch pickle).

    ``trusted`` (files this project wrote) only allows extra pickled objects next to the
    weights; tensors are always loaded with ``weights_only=True`` first. ``mmap`` maps a torch
    file's tensors instead of reading them (safetensors files are always mapped).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            obj: Any = safetensors.torch.load_file(str(path), device="cpu")
        else:
            obj = torch_load(path, trusted=trusted, mmap=mmap)
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupt/truncated files raise many types
        raise ModelLoadError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {_load_error_detail(exc)} "
            "(corrupt, truncated, or not a torch/safetensors file?); copy or save it again"
        ) from exc
    return _strip_wrapper_prefixes(_select_state_dict(obj, path))


def _load_error_detail(exc: Exception) -> str:
    """The useful part of a load error. torch's weights-only unpickler wraps the real problem
    (e.g. 'Unsupported operand 0' for random bytes) in advice to retry with weights_only=False,
    which is wrong for a damaged file and unsafe for a foreign one: keep only the problem."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        lines = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        text = lines[0] if lines else text
    if not text.strip():
        return "empty or unreadable file"
    first = text.strip().splitlines()[0]
    return (first.split(". ")[0] if len(first) > 200 else first)[:300]


# --------------------------------------------------------------------------------------------
# Fitting a state dict to a model
# --------------------------------------------------------------------------------------------


def _resample_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Resize a ViT/DeiT ``pos_embed`` in place when the checkpoint's patch grid differs."""
    old = state.get("pos_embed")
    new = getattr(model, "pos_embed", None)
    if old is None or new is None or old.shape == new.shape or old.shape[-1] != new.shape[-1]:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    side = math.isqrt(old.shape[1] - prefix)
    if side * side != old.shape[1] - prefix:
        return  # not a square grid with this many prefix tokens: left for the shape report
    state["pos_embed"] = resample_abs_pos_embed(
        old,
        new_size=list(model.patch_embed.grid_size),
        old_size=[side, side],
        num_prefix_tokens=prefix,
    )


def _head_keys(model: nn.Module, keys: Iterable[str]) -> set[str]:
    heads = _classifier_names(model)
    return {k for k in keys if any(k.startswith(h + ".") for h in heads)}


def _first(items: list[str], limit: int = 10) -> str:
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _mismatch_report(
    missing: list[str],
    unexpected: list[str],
    shapes: list[str],
    *,
    where: str,
    path: Path,
    model: nn.Module,
) -> str:
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    lines = [f"{where + ': ' if where else ''}checkpoint {path} does not fit model '{arch}':"]
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            lines.append(f"  {label} ({len(items)}): {_first(items)}")
    lines.append(
        "  check that the checkpoint was trained for this architecture (and img_size/num_classes)"
    )
    return "\n".join(lines)


def _fit_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module, *, source: str, where: str, path: Path
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Resample pos-embeds, drop a foreign head (source 'file'); report everything else at once.

    Returns the state dict to load and the model keys allowed to stay freshly initialised.
    """
    state = dict(state)
    _resample_pos_embed(state, model)
    target = model.state_dict()
    fresh: set[str] = set()
    if source == "file":  # another task's head (e.g. ImageNet-1k): keep the new one
        for key in _head_keys(model, target):
            if key not in state or state[key].shape != target[key].shape:
                state.pop(key, None)
                fresh.add(key)
    missing = sorted(
        k for k in target.keys() - state.keys() - fresh if not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(state.keys() - target.keys())
    wrong = sorted(k for k in state.keys() & target.keys() if state[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        shapes = [
            f"{k}: checkpoint {list(state[k].shape)} vs model {list(target[k].shape)}"
            for k in wrong
        ]
        message = _mismatch_report(missing, unexpected, shapes, where=where, path=path, model=model)
        if source == "row" and _head_keys(model, wrong):
            message += (
                "\n  source 'row' keeps the checkpoint's head: both rows must use the same"
                " dataset (num_classes)"
            )
        raise ModelLoadError(message)
    return state, fresh


def _load_checkpoint(
    model: nn.Module, path: Path, *, source: str, trusted: bool, where: str
) -> None:
    try:
        state = load_state_file(path, trusted=trusted)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where}: {exc}" if where else str(exc)) from exc
    try:
        state, fresh = _fit_state_dict(state, model, source=source, where=where, path=path)
    except ModelLoadError:
        raise
    except Exception as exc:  # e.g. pos_embed resampling on an odd checkpoint
        raise ModelLoadError(
            f"{where + ': ' if where else ''}cannot adapt checkpoint {path}: {exc}"
        ) from exc
    result = model.load_state_dict(state, strict=False)
    left = [
        k for k in result.missing_keys if k not in fresh and not k.endswith("num_batches_tracked")
    ]
    if left or result.unexpected_keys:
        raise ModelLoadError(
            _mismatch_report(
                left, list(result.unexpected_keys), [], where=where, path=path, model=model
            )
        )


def check_checkpoint(
    name: str, path: str | Path, *, img_size: int | None = None, num_classes: int = 1000
) -> list[str]:
    """Why ``build_model(name, source="file", checkpoint=path)`` would fail, found cheaply; [].

    The grid validator calls this for every `init.file` and `teacher.file`, so that an unreadable
    or corrupt file, or one saved from another architecture, is a bad-input error before anything
    is submitted, not a failed job hours later. The file is read with ``weights_only=True`` and
    its tensors memory-mapped (nothing is copied), the model is built on the meta device (no
    memory, no initialisation), and the state dict is fitted exactly as loading it would be: a
    foreign classifier head is dropped and ViT position embeddings are resampled, so neither
    ``num_classes`` nor ``img_size`` of the checkpoint has to match.
    """
    path = Path(path)
    try:
        state = load_state_file(path, mmap=True)
    except ModelLoadError as exc:
        return [str(exc)]
    arch, _ = _split_tag(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if img_size is not None and _accepts_img_size(arch):
        kwargs["img_size"] = img_size
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as exc:  # reported by the model-name check when the name is the problem
        return [f"cannot build '{arch}' to check {path} against it: {exc}"]
    try:
        _fit_state_dict(state, model, source="file", where="", path=path)
    except ModelLoadError as exc:
        return [str(exc)]
    except Exception as exc:  # e.g. pos_embed resampling on an odd checkpoint
        return [f"cannot adapt checkpoint {path} to '{arch}': {exc}"]
    return []


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _accepts_img_size(arch: str) -> bool:
    return timm.models.is_model_in_modules(arch, _IMG_SIZE_MODULES)


def _validate_build_args(
    name: str, source: str, pretrained_tag: str | None, checkpoint: str | Path | None, where: str
) -> str:
    """The full timm name (``arch.tag``) after checking the arguments agree; errors name the row."""
    at = f"{where}: " if where else ""
    if source not in SOURCES:
        raise ModelLoadError(f"{at}unknown source '{source}'; expected one of {', '.join(SOURCES)}")
    arch, tag = _split_tag(name)
    if tag and pretrained_tag and tag != pretrained_tag:
        raise ModelLoadError(
            f"{at}model '{name}' has tag '{tag}' but pretrained_tag is '{pretrained_tag}'"
        )
    full = f"{arch}.{tag or pretrained_tag}" if (tag or pretrained_tag) else arch
    problem = check_model_name(full)
    if problem:
        raise ModelLoadError(at + problem)
    if source == "pretrained" and not _pretrained_tags().get(arch):
        raise ModelLoadError(
            f"{at}timm has no pretrained weights for '{arch}'; use source 'scratch'"
        )
    if source in ("file", "row") and checkpoint is None:
        raise ModelLoadError(f"{at}source '{source}' needs a checkpoint path")
    if source in ("scratch", "pretrained") and checkpoint is not None:
        raise ModelLoadError(
            f"{at}source '{source}' takes no checkpoint (got {checkpoint}); use source 'file'"
        )
    return full


def build_model(
    name: str,
    *,
    num_classes: int,
    img_size: int | None = None,
    source: str = "scratch",
    pretrained_tag: str | None = None,
    checkpoint: str | Path | None = None,
    trusted_checkpoint: bool = False,
    drop_path_rate: float = 0.0,
    where: str = "",
) -> nn.Module:
    """A timm model with ``num_classes`` outputs and weights from ``source``.

    A distilled DeiT comes with timm's distilled training on: in train mode it returns
    ``(cls_logits, dist_logits)``, in eval their mean, as DeiT trains and evaluates.
    ``img_size`` is passed only to fixed-size models (ViT/DeiT); CNNs take any size. ``where``
    (e.g. "row 'deit_b_dist_hard' (grids/table2b.yaml)") prefixes every error message.
    """
    full = _validate_build_args(name, source, pretrained_tag, checkpoint, where)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if img_size is not None and _accepts_img_size(full):
        kwargs["img_size"] = img_size
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    pretrained = source == "pretrained"
    try:
        model = timm.create_model(full, pretrained=pretrained, **kwargs)
    except Exception as exc:
        hint = (
            "; compute nodes without network: download the weights into the Hugging Face cache"
            " (HF_HOME) on a login node and set HF_HUB_OFFLINE=1, or use source 'file'"
            if pretrained
            else ""
        )
        at = f"{where}: " if where else ""
        raise ModelLoadError(
            f"{at}cannot create timm model '{full}' ({kwargs}): {exc}{hint}"
        ) from exc
    if source in ("file", "row"):
        _load_checkpoint(
            model, Path(checkpoint), source=source, trusted=trusted_checkpoint, where=where
        )
    if isinstance(model, VisionTransformerDistilled):
        model.set_distilled_training(True)  # DeiT: cls and distillation heads apart in training
    return model

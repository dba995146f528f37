"""Checkpoint files: reading them safely (weights_only, safetensors), finding the state dict
inside whatever a training script saved, and fitting it to a model with every mismatch reported
at once, naming the row, the file and the keys."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from kd.config import first_of
from kd.models import smoke_bit  # noqa: F401  (registers the smoke BiT with timm)
from kd.models.inspect import classifier_names
from kd.models.names import ModelLoadError, split_tag

# timm modules whose models take ``img_size`` (fixed-size position embeddings); CNNs do not need it.
_IMG_SIZE_MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid", "eva", "beit")

# Prefixes added by wrappers around a model when it is saved: DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Keys under which training scripts store the weights, in order of preference. EMA weights are used
# only when the file holds no plain model weights (an EMA-only export).
_STATE_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema")


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
    heads = classifier_names(model)
    return {k for k in keys if any(k.startswith(h + ".") for h in heads)}


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
            lines.append(f"  {label} ({len(items)}): {first_of(items)}")
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


def load_checkpoint(
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
    arch, _ = split_tag(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if img_size is not None and accepts_img_size(arch):
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


def accepts_img_size(arch: str) -> bool:
    """Whether timm's model takes ``img_size`` (fixed-size position embeddings); CNNs do not."""
    return timm.models.is_model_in_modules(arch, _IMG_SIZE_MODULES)

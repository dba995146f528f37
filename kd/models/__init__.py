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

    names.py      names and tags, their checks, the --smoke stand-ins (no torch)
    smoke_bit.py  the tiny BiT registered with timm
    inspect.py    unwrapping, heads, data config, forward with the pooled embedding
    weights.py    reading checkpoint files and fitting them to a model
    build.py      build_model
    hub.py        where timm reads a pretrained tag from, in the hub cache or not, prefetching
"""

from __future__ import annotations

import importlib
from typing import Any

from kd.models.names import (
    SMOKE_BIT,
    SMOKE_MODELS,
    SOURCES,
    ModelLoadError,
    check_model_name,
    smoke_model_name,
)

# What imports timm and torch is imported on first use, so that reading a grid (names, smoke
# stand-ins, name checks from the cache) stays light: `from kd.models import build_model` works
# as before.
_LAZY = {
    "build_model": "kd.models.build",
    "ModelOutputs": "kd.models.inspect",
    "count_params": "kd.models.inspect",
    "data_config": "kd.models.inspect",
    "embedding_dim": "kd.models.inspect",
    "forward_with_embedding": "kd.models.inspect",
    "freeze_teacher": "kd.models.inspect",
    "is_distilled": "kd.models.inspect",
    "unwrap_model": "kd.models.inspect",
    "check_checkpoint": "kd.models.weights",
    "load_checkpoint": "kd.models.weights",
    "load_state_file": "kd.models.weights",
    "torch_load": "kd.models.weights",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kd.models' has no attribute '{name}'")


__all__ = [
    "SMOKE_BIT",
    "SMOKE_MODELS",
    "SOURCES",
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
    "load_checkpoint",
    "load_state_file",
    "smoke_model_name",
    "torch_load",
    "unwrap_model",
]

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

from kd.models.build import build_model
from kd.models.inspect import (
    ModelOutputs,
    count_params,
    data_config,
    embedding_dim,
    forward_with_embedding,
    freeze_teacher,
    is_distilled,
    unwrap_model,
)
from kd.models.names import (
    SMOKE_BIT,
    SMOKE_MODELS,
    SOURCES,
    ModelLoadError,
    check_model_name,
    smoke_model_name,
)
from kd.models.weights import check_checkpoint, load_checkpoint, load_state_file, torch_load

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

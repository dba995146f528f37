"""Where timm reads a pretrained tag's weights from, whether they are on this machine (the
Hugging Face Hub cache, or torch hub's cache for weights only published by URL), whether they
can be downloaded from here, and downloading them once.

Compute nodes often have no network: a launch checks every pretrained tag it needs with these
functions before it submits anything (`kd.preflight`), so that a missing weight is an error at
launch, not a job that fails after hours in the queue.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

#: timm's order for the default file of a hub repo: a safetensors copy first, then the pickle
#: (timm.models._hub.load_state_dict_from_hf).
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
OFFLINE_ENV = "HF_HUB_OFFLINE"


@dataclass(frozen=True)
class WeightSource:
    """One pretrained tag's weights, as timm's `create_model(pretrained=True)` looks for them."""

    name: str  # the timm name, arch.tag
    hf_repo: str | None  # e.g. timm/deit_base_distilled_patch16_384.fb_in1k
    hf_revision: str | None
    hf_files: tuple[str, ...]  # candidates, in the order timm tries them
    url: str | None  # weights only published by URL (torch hub's cache)

    def describe(self) -> str:
        if self.hf_repo:
            rev = f"@{self.hf_revision}" if self.hf_revision else ""
            return f"Hugging Face repo {self.hf_repo}{rev} ({' or '.join(self.hf_files)})"
        return f"URL {self.url}"


def weight_source(name: str) -> WeightSource:
    """Where timm loads `name`'s pretrained weights from (its pretrained_cfg, resolved as
    timm's `_resolve_pretrained_source` does for a default source)."""
    import timm.models
    from timm.models._hub import hf_split

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config for '{name}'")
    if cfg.hf_hub_id:
        repo, revision = hf_split(cfg.hf_hub_id)
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
        return WeightSource(name, repo, revision, files, None)
    return WeightSource(name, None, None, (), cfg.url or None)


def _torch_hub_file(url: str) -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def cached_file(source: WeightSource, cache_dir: str | Path | None = None) -> Path | None:
    """The cached weights file timm would read for `source`, or None when none is cached."""
    if source.hf_repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in source.hf_files:
            found = try_to_load_from_cache(
                source.hf_repo, filename, cache_dir=cache_dir, revision=source.hf_revision
            )
            if isinstance(found, str):
                return Path(found)
        return None
    if source.url:
        path = _torch_hub_file(source.url)
        return path if path.is_file() else None
    return None


def download_problem(source: WeightSource, timeout_s: float) -> str | None:
    """None when the weights can be downloaded from here (a metadata request, no download),
    else why not."""
    if source.hf_repo:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

        if constants.HF_HUB_OFFLINE:
            return f"{OFFLINE_ENV} is set here"
        reasons = []
        for filename in source.hf_files:
            url = hf_hub_url(source.hf_repo, filename, revision=source.hf_revision)
            try:
                get_hf_file_metadata(url, timeout=timeout_s)
                return None
            except Exception as exc:  # noqa: BLE001 - any failure means: not from here
                reasons.append(f"{filename}: {_short(exc)}")
        return "; ".join(reasons)
    if source.url:
        request = urllib.request.Request(source.url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                return None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return _short(exc)
    return "timm names no file or URL for it"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def prefetch(name: str) -> Path:
    """Download `name`'s weights into the cache as timm itself would load them (so the cached
    file is the one a job reads), and return the cached file."""
    import timm

    timm.create_model(name, pretrained=True)
    path = cached_file(weight_source(name))
    if path is None:
        raise FileNotFoundError(f"'{name}' was loaded, but its weights are not in the cache")
    return path

"""Helpers for the code-snapshot and weights-preflight tests: a throwaway copy of this checkout
(a git repository of its own, which a test may edit freely), and a real Hugging Face hub cache
holding a tiny timm model's weights."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIT_ID = ["-c", "user.email=tests@kdgrid", "-c", "user.name=kdgrid tests"]
TINY_PRETRAINED = "test_resnet.r160_in1k"  # timm's ~0.2M-parameter ResNet, hub repo timm/...


def copy_checkout(dest: Path) -> Path:
    """The files `git ls-files -co --exclude-standard` lists here, committed in a new git
    repository at `dest` (the test's own checkout, edited without touching the real one)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(["git", *GIT_ID, "-C", str(dest), *args], check=True)
    return dest


def break_training(checkout: Path) -> None:
    """Edit the checkout so that any row process importing the trainer from it fails at once."""
    runner = checkout / "kd" / "train" / "runner.py"
    text = runner.read_text()
    runner.write_text(text + '\nraise RuntimeError("the checkout was edited after the launch")\n')


def make_hf_cache(hf_home: Path, name: str = TINY_PRETRAINED, seed: int = 0) -> dict:
    """A Hugging Face hub cache under `hf_home` in the layout huggingface_hub reads
    (hub/models--org--name/{blobs,snapshots/<rev>,refs/main}), holding the state dict of a real
    timm model `name` as model.safetensors. Returns that state dict."""
    import safetensors.torch
    import timm
    import torch

    torch.manual_seed(seed)
    arch = name.split(".")[0]
    state = timm.create_model(arch, pretrained=False).state_dict()
    state = {k: v.contiguous() for k, v in state.items()}
    repo = hf_home / "hub" / f"models--timm--{name}"
    revision = hashlib.sha1(name.encode()).hexdigest()
    blob = repo / "blobs" / "weights.tmp"
    blob.parent.mkdir(parents=True)
    safetensors.torch.save_file(state, str(blob))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    blob = blob.rename(blob.with_name(digest))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return state

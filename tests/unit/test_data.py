"""kd.data: every layout generated in its real on-disk form, then read back through the real readers."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.data import (
    DATASETS,
    BatchNormalize,
    DatasetError,
    DatasetSpec,
    NormalizedBatches,
    build_loader,
    build_mixup,
    build_transforms,
    check_dataset,
    generate_dataset,
    load_split,
    num_classes,
)

SMALL = {"num_classes": 4, "train_per_class": 4, "test_per_class": 2, "image_size": 32}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DatasetSpec]:
    """One read-only generated copy per layout; tests that damage a copy make their own."""
    base = tmp_path_factory.mktemp("copies")
    return {name: generate_dataset(name, base / name, **SMALL) for name in DATASETS}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_generated_copy_loads_with_zero_based_rgb_samples(name, copies):
    spec = copies[name]
    assert check_dataset(spec) == []
    assert num_classes(spec) == 4
    for split, per_class in (("train", 4), ("test", 2)):
        data = load_split(spec, split)
        assert len(data) == 4 * per_class
        assert data.num_classes == len(data.classes) == 4
        assert sorted(set(data.targets)) == [0, 1, 2, 3]
        image, label = data[len(data) - 1]
        assert isinstance(label, int) and 0 <= label < 4
        assert image.mode == "RGB"


def test_cub_greyscale_images_are_loaded_as_rgb(copies):
    data = load_split(copies["cub"], "train")
    modes = [Image.open(path).mode for path, _ in data.samples]
    assert "L" in modes and "RGB" in modes
    grey = modes.index("L")
    assert data[grey][0].mode == "RGB"


def test_cub_dogs_offsets_dog_labels_after_cub_classes(copies):
    spec = copies["cub_dogs"]
    data = load_split(spec, "train")
    cub_classes = num_classes(DatasetSpec("cub", spec.root))
    assert data.classes[:cub_classes] == load_split(DatasetSpec("cub", spec.root), "train").classes
    dog_labels = {label for path, label in data.samples if path.startswith(str(spec.dogs_root))}
    assert dog_labels == set(range(cub_classes, 4))
    assert data.classes[cub_classes].startswith("n0")  # a synset-breed folder


def test_foodx_test_split_is_the_val_set(copies):
    data = load_split(copies["foodx"], "test")
    assert all(Path(path).parent.name == "val_set" for path, _ in data.samples)


def test_cifar10_accepts_the_batches_folder_itself(copies):
    inner = DatasetSpec("cifar10", str(Path(copies["cifar10"].root) / "cifar-10-batches-py"))
    assert check_dataset(inner) == []
    assert len(load_split(inner, "test")) == len(load_split(copies["cifar10"], "test")) == 8
    assert load_split(inner, "train")[0][0].size == (32, 32)


def test_imagefolder_accepts_val_as_the_test_split(tmp_path):
    spec = generate_dataset("imagefolder", tmp_path / "if", **SMALL)
    (Path(spec.root) / "test").rename(Path(spec.root) / "val")
    assert check_dataset(spec) == []
    assert all("/val/" in path for path, _ in load_split(spec, "test").samples)


def test_check_dataset_reports_every_problem_at_once(tmp_path):
    spec = generate_dataset("cub", tmp_path / "cub", **SMALL)
    (Path(spec.root) / "images.txt").unlink()
    (Path(spec.root) / "train_test_split.txt").unlink()
    problems = check_dataset(spec)
    assert len(problems) == 2
    assert any(str(Path(spec.root) / "images.txt") in p for p in problems)
    assert any("train_test_split.txt" in p for p in problems)
    with pytest.raises(DatasetError, match="images.txt"):
        load_split(spec, "train")


def test_check_dataset_never_raises_on_bad_specs(tmp_path):
    [unknown] = check_dataset(DatasetSpec("cubb", str(tmp_path)))
    assert "did you mean 'cub'" in unknown and "imagefolder" in unknown
    assert (
        str(tmp_path / "nowhere")
        in check_dataset(DatasetSpec("foodx", str(tmp_path / "nowhere")))[0]
    )
    problems = check_dataset(DatasetSpec("cub_dogs", str(tmp_path / "a"), None))
    assert len(problems) == 2 and "dogs_root" in problems[1]
    with pytest.raises(DatasetError, match="did you mean 'dogs'"):
        num_classes(DatasetSpec("dog", str(tmp_path)))


def test_malformed_index_line_names_file_and_line(tmp_path):
    spec = generate_dataset("cub", tmp_path / "cub", **SMALL)
    labels = Path(spec.root) / "image_class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[2] = "3 three"
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt line 3"):
        load_split(spec, "train")


def test_label_out_of_range_names_file_and_line(tmp_path):
    spec = generate_dataset("foodx", tmp_path / "foodx", **SMALL)
    csv = Path(spec.root) / "annot" / "val_info.csv"
    csv.write_text(csv.read_text().replace(",3\n", ",9\n", 1))
    with pytest.raises(DatasetError, match=r"val_info\.csv line \d+: label 9"):
        load_split(spec, "test")


def test_missing_listed_image_names_index_and_image(tmp_path):
    spec = generate_dataset("dogs", tmp_path / "dogs", **SMALL)
    data = load_split(spec, "test")
    missing = Path(data.samples[1][0])
    missing.unlink()
    with pytest.raises(DatasetError, match=r"test_list\.mat entry 2") as err:
        load_split(spec, "test")
    assert str(missing) in str(err.value)


def test_truncated_jpeg_names_the_image(tmp_path):
    spec = generate_dataset("cub", tmp_path / "cub", **SMALL)
    data = load_split(spec, "train")
    path = Path(data.samples[1][0])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match="truncated") as err:
        data[1]
    assert str(path) in str(err.value)


def test_transforms_give_the_requested_tensor_shape(copies):
    data = load_split(copies["cub"], "train")
    wide = Image.new("RGB", (60, 30), (200, 10, 10))
    train = build_transforms(train=True, img_size=24, mean=MEAN, std=STD, re_prob=0.25)
    evaluate = build_transforms(train=False, img_size=24, mean=MEAN, std=STD)
    squash = build_transforms(
        train=False, img_size=24, mean=MEAN, std=STD, crop_mode="squash", crop_pct=1.0
    )
    for transform in (train, evaluate, squash):
        assert transform(data[0][0]).shape == (3, 24, 24)
        assert transform(wide).shape == (3, 24, 24)
    # squash keeps the whole width, the centre crop loses the blue strip at the right edge
    wide.paste((10, 10, 200), (54, 0, 60, 30))
    squashed, cropped = squash(wide)[:, 12, -1], evaluate(wide)[:, 12, -1]
    assert squashed[2] > squashed[0] and cropped[0] > cropped[2]


def test_uint8_batches_normalised_on_the_device_equal_the_float_pipeline(copies):
    """The loaders' uint8 images + BatchNormalize give what ToTensor + Normalize gave."""
    data = load_split(copies["cub"], "test")
    as_float = build_transforms(train=False, img_size=24, mean=MEAN, std=STD)
    as_uint8 = build_transforms(train=False, img_size=24, mean=MEAN, std=STD, uint8=True)
    images = [data[i][0] for i in range(4)]
    batch = torch.stack([as_uint8(image) for image in images])
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 24, 24)
    expected = torch.stack([as_float(image) for image in images])
    torch.testing.assert_close(BatchNormalize(MEAN, STD)(batch), expected, rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        BatchNormalize(MEAN, STD)(expected)


def test_uint8_transforms_refuse_random_erasing_they_would_drop():
    with pytest.raises(ValueError, match="BatchNormalize"):
        build_transforms(train=True, img_size=24, mean=MEAN, std=STD, re_prob=0.25, uint8=True)


def test_random_erasing_on_the_device_is_seeded_by_the_training_process():
    batch = torch.full((6, 3, 32, 32), 128, dtype=torch.uint8)
    clean = BatchNormalize(MEAN, STD)(batch)
    erase = BatchNormalize(MEAN, STD, re_prob=1.0)

    def erased() -> torch.Tensor:
        torch.manual_seed(3)
        random.seed(3)
        return erase(batch)

    first = erased()
    changed = (first != clean).flatten(1).any(dim=1)
    assert changed.all(), "re_prob=1 erases a block of every image"
    assert ((first != clean).float().mean() < 0.5).item(), "a block, not the whole image"
    torch.testing.assert_close(erased(), first, rtol=0, atol=0)  # same seeds, same erasing


def test_normalized_batches_wrap_a_loader(copies):
    transform = build_transforms(train=False, img_size=16, mean=MEAN, std=STD, uint8=True)
    data = load_split(copies["cifar10"], "test", transform=transform)
    loader = build_loader(data, batch_size=4, train=False, num_workers=0)
    wrapped = NormalizedBatches(loader, BatchNormalize(MEAN, STD))
    assert len(wrapped) == len(loader) and wrapped.dataset is data and wrapped.batch_size == 4
    for (images, labels), (raw, raw_labels) in zip(wrapped, loader, strict=True):
        assert images.dtype == torch.float32 and raw.dtype == torch.uint8
        assert torch.equal(labels, raw_labels)
        torch.testing.assert_close(images, (raw.float() / 255 - 0.5) / 0.25)


def _augmented_by_index(loader) -> dict[int, torch.Tensor]:
    """Index -> augmented image, for a loader over a dataset of (image, index) pairs."""
    return {
        int(i): image
        for images, indices in loader
        for image, i in zip(images, indices, strict=True)
    }


def test_seeded_augmentations_depend_on_seed_epoch_and_index_only(copies):
    """Persistent or fresh workers, two workers or none, shuffled differently: an image's
    augmentations in an epoch are the same; another epoch augments it differently."""
    transform = build_transforms(train=True, img_size=24, mean=MEAN, std=STD, uint8=True)
    data = load_split(copies["cub"], "train", transform=transform)
    data.samples = [(path, index) for index, (path, _) in enumerate(data.samples)]  # label = index

    def epoch(loader, number: int) -> dict[int, torch.Tensor]:
        data.seed_augmentations(5, number)
        return _augmented_by_index(loader)

    persistent = build_loader(data, batch_size=4, train=True, num_workers=2, seed=1)
    assert persistent.persistent_workers
    next(iter(persistent))  # workers started before seeding (epoch 0, seed 5) see it too
    in_process = build_loader(data, batch_size=4, train=True, num_workers=0, seed=2)
    first, second = epoch(persistent, 0), epoch(persistent, 1)  # the same worker processes
    assert first.keys() == second.keys() == set(range(len(data)))
    assert any(not torch.equal(first[i], second[i]) for i in first), "each epoch augments anew"
    for number, seen in ((1, second), (0, first)):
        again = epoch(in_process, number)
        assert all(torch.equal(again[i], seen[i]) for i in seen), f"epoch {number} differs"


def test_seeded_augmentations_leave_the_training_process_rngs_alone(copies):
    transform = build_transforms(train=True, img_size=24, mean=MEAN, std=STD)
    data = load_split(copies["cub"], "train", transform=transform)
    data.seed_augmentations(-5, 0)  # a negative seed works too
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    data[0], data[1]  # noqa: B018 - read in this process, as a loader without workers does
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    data.__getitems__([0, 1])  # what the DataLoader's fetcher calls for a batch
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_batch_fetch_augments_each_image_as_one_by_one(copies):
    """`__getitems__` (the DataLoader's batch fetch) seeds each image as `__getitem__` does."""
    transform = build_transforms(train=True, img_size=24, mean=MEAN, std=STD)
    data = load_split(copies["cub"], "train", transform=transform)
    data.seed_augmentations(3, 2)
    indices = [2, 0, 1, 2]
    batch = data.__getitems__(indices)
    for index, (image, label) in zip(indices, batch, strict=True):
        alone, alone_label = data[index]
        assert torch.equal(image, alone) and label == alone_label
    assert not torch.equal(batch[0][0], batch[1][0])


def test_mixup_only_when_an_alpha_is_set():
    assert build_mixup(4, 0.0, 0.0, 0.1) is None
    mixup = build_mixup(4, 0.8, 1.0, 0.1)
    images, targets = mixup(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert images.shape == (4, 3, 8, 8) and targets.shape == (4, 4)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_loader_yields_seeded_batches(copies):
    transform = build_transforms(train=False, img_size=16, mean=MEAN, std=STD)
    data = load_split(copies["cifar10"], "train", transform=transform)

    def first_labels(seed: int) -> list[int]:
        loader = build_loader(data, batch_size=8, train=True, num_workers=0, seed=seed)
        images, labels = next(iter(loader))
        assert images.shape == (8, 3, 16, 16) and labels.dtype == torch.int64
        return labels.tolist()

    assert first_labels(1) == first_labels(1)
    assert len(build_loader(data, batch_size=6, train=True, num_workers=0)) == 2  # drop_last
    assert len(build_loader(data, batch_size=6, train=False, num_workers=0)) == 3
    with pytest.raises(ValueError, match="fewer than batch_size"):
        build_loader(data, batch_size=64, train=True, num_workers=0)


def test_generated_classes_are_separable(copies):
    """Class means of the raw pixels classify the test split: a tiny model can learn them."""

    def pixels(split: str) -> tuple[np.ndarray, np.ndarray]:
        data = load_split(copies["cub"], split)
        x = np.stack(
            [
                np.asarray(data[i][0].convert("L"), dtype=np.float32).ravel()
                for i in range(len(data))
            ]
        )
        return x, np.array(data.targets)

    x, y = pixels("train")
    centroids = np.stack([x[y == c].mean(0) for c in range(4)])
    x_test, y_test = pixels("test")
    predicted = ((x_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == y_test).mean() > 0.5  # chance is 0.25


def test_generate_dataset_is_idempotent(tmp_path):
    spec = generate_dataset("cub_dogs", tmp_path / "cd", **SMALL)
    assert (spec.root, spec.dogs_root) == (
        str(tmp_path / "cd/cub"),
        str(tmp_path / "cd/dogs"),
    )
    marker = tmp_path / "cd" / ".kdgrid_generated.json"
    stamp = marker.stat().st_mtime_ns
    assert generate_dataset("cub_dogs", tmp_path / "cd", **SMALL) == spec
    assert marker.stat().st_mtime_ns == stamp
    bigger = generate_dataset("cub_dogs", tmp_path / "cd", **{**SMALL, "num_classes": 6})
    assert num_classes(bigger) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["cd"]  # no staging folder left behind


def test_generate_dataset_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        generate_dataset("cub", tmp_path)
    assert (tmp_path / "mine.txt").exists()


def test_randaugment_posterize_never_asks_pillow_for_zero_bits():
    """timm's posterize at 0 bits (magnitude noise can reach it) must not crash training."""
    import timm.data.auto_augment as auto_augment
    from PIL import Image

    import kd.data.transforms  # noqa: F401  (patches timm's op table on import)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        out = auto_augment.NAME_TO_OP[name](Image.new("RGB", (8, 8), (200, 100, 50)), 0)
        assert out.size == (8, 8)


# --------------------------------------------------------------------------------------------
# The test split's transform cache
# --------------------------------------------------------------------------------------------


def _eval_batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), targets.clone()) for images, targets in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_cached_test_split_gives_the_same_batches_without_reading_the_images(tmp_path, workers):
    """Pass 1 fills the cache (in loader workers too: shared pages); the images are then
    deleted, and pass 2, read from the cache, equals pass 1 and an uncached loader."""
    from kd.data import cache_split

    spec = generate_dataset("cub", tmp_path / "cub", **{**SMALL, "test_per_class": 5})
    tf = build_transforms(train=False, img_size=24, mean=MEAN, std=STD, uint8=True)
    plain = load_split(spec, "test", transform=tf)
    expected = _eval_batches(build_loader(plain, batch_size=4, train=False, num_workers=0))

    data = load_split(spec, "test", transform=tf)
    loader = build_loader(data, batch_size=4, train=False, num_workers=workers)
    cache = cache_split(loader, (3, 24, 24), limit_gb=1, folder=str(tmp_path))
    assert cache is not None and data.cache is cache and cache.nbytes == 20 * 3 * 24 * 24
    assert not list(tmp_path.glob("kdgrid-transform-cache-*"))  # unlinked at once
    first = _eval_batches(loader)
    assert bool(cache.filled.all())  # what the workers computed is seen here
    for path in (Path(spec.root) / "images").rglob("*.jpg"):
        path.unlink()
    second = _eval_batches(loader)
    assert len(first) == len(second) == len(expected) == 5
    for (a, ya), (b, yb), (c, yc) in zip(expected, first, second, strict=True):
        assert a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(a, c)
        assert torch.equal(ya, yb) and torch.equal(ya, yc)
    image, _ = data[0]
    image.zero_()  # what a reader does with an item does not reach the cache
    assert torch.equal(data[0][0], expected[0][0][0])


def test_a_process_caches_only_its_shard_of_the_split(tmp_path):
    """With Accelerate each process reads a shard: its cache holds those images only."""
    from kd.data import TransformCache

    cache = TransformCache([4, 5, 6, 7, 5], size=10, shape=(3, 2, 2), folder=str(tmp_path))
    assert cache.nbytes == 4 * 12 and cache.images.shape == (4, 3, 2, 2)
    cache.put(5, torch.full((3, 2, 2), 5, dtype=torch.uint8), 1)
    cache.put(0, torch.full((3, 2, 2), 9, dtype=torch.uint8), 1)  # another process's image
    assert cache.get(0) is None and int(cache.filled.sum()) == 1
    assert torch.equal(cache.get(5)[0], torch.full((3, 2, 2), 5, dtype=torch.uint8))


def test_cache_split_says_why_it_does_not_cache(tmp_path, monkeypatch, capsys):
    from kd.data import cache as D

    spec = generate_dataset("imagefolder", tmp_path / "folder", **SMALL)
    data = load_split(spec, "test")

    def loader(workers=0):
        return build_loader(data, batch_size=4, train=False, num_workers=workers)

    assert D.cache_split(loader(), (3, 8, 8), limit_gb=0, folder=str(tmp_path)) is None
    assert capsys.readouterr().err == ""  # turned off: nothing to say
    assert D.cache_split(loader(), (3, 2**12, 2**12), limit_gb=0.01, folder=str(tmp_path)) is None
    assert "over data.eval_cache_gb=0.01" in capsys.readouterr().err
    spawned = build_loader(data, batch_size=4, train=False, num_workers=2)
    spawned.multiprocessing_context = "spawn"
    assert D.cache_split(spawned, (3, 8, 8), limit_gb=1, folder=str(tmp_path)) is None
    assert "start by 'spawn', not 'fork'" in capsys.readouterr().err
    assert D.cache_split(loader(), (3, 8, 8), limit_gb=1, folder="/dev/shm") is None
    assert "/dev/shm is in memory (tmpfs)" in capsys.readouterr().err

    class Usage:
        free = 2**29  # 0.5 GiB: less than the 1 GiB kept free

    monkeypatch.setattr(D.shutil, "disk_usage", lambda _folder: Usage)
    assert D.cache_split(loader(), (3, 8, 8), limit_gb=1, folder=str(tmp_path)) is None
    err = capsys.readouterr().err
    assert "do not fit in" in err and str(tmp_path) in err and "TMPDIR" in err
    assert data.cache is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_transform_cache_skips_what_it_cannot_hold_and_is_left_out_of_pickles(tmp_path):
    import pickle

    from kd.data import TransformCache

    cache = TransformCache(range(3), 3, (3, 4, 4), folder=str(tmp_path))
    cache.put(0, torch.ones(3, 4, 4, dtype=torch.uint8), 7)
    cache.put(1, torch.ones(3, 5, 5, dtype=torch.uint8), 1)  # another shape
    cache.put(2, torch.ones(3, 4, 4), 1)  # float: not what the test loader gives
    image, label = cache.get(0)
    assert torch.equal(image, torch.ones(3, 4, 4, dtype=torch.uint8)) and label == 7
    assert cache.get(1) is None and cache.get(2) is None

    spec = generate_dataset("imagefolder", tmp_path / "folder", **SMALL)
    data = load_split(spec, "test")
    data.cache = cache
    copy = pickle.loads(pickle.dumps(data))  # as spawned workers get it: no cache, same data
    assert copy.cache is None and data.cache is cache and len(copy) == len(data)

"""kd.cluster: k-means NMI/ARI with known answers, the t-SNE map as a real PNG, the
`evaluate` config section (validation, content keys, --smoke copies) and which weights a row's
clustering sees. Fast: synthetic embeddings, one tiny model, generated data.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd import cluster
from kd.grid import GridError, load_grid
from kd.smoke import prepare_smoke_data


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(classes: int, per_class: int, dim: int = 16, spread: float = 0.01, seed: int = 0):
    """Tight clusters around random, far-apart centres; labels 0..classes-1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(classes, dim)) * 10
    labels = np.repeat(np.arange(classes), per_class)
    points = centres[labels] + rng.normal(0, spread, size=(len(labels), dim))
    return points, labels


# --------------------------------------------------------------------------------------------
# Scores with a known answer


def test_perfectly_separated_clusters_score_one_whatever_the_label_ids():
    points, labels = blobs(classes=5, per_class=20)
    renamed = np.array([7, 3, 9, 0, 4])[labels]  # cluster ids never match label ids anyway
    for y in (labels, renamed):
        scores = cluster.cluster_scores(points, y, normalize=False)
        assert scores == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}


def test_labels_unrelated_to_the_clusters_score_near_zero():
    points, _ = blobs(classes=5, per_class=100)
    random_labels = np.random.default_rng(1).integers(0, 5, size=len(points))
    scores = cluster.cluster_scores(points, random_labels, num_clusters=5)
    assert 0 <= scores["nmi"] < 0.05
    assert abs(scores["ari"]) < 0.03


def test_half_the_classes_merged_scores_in_between():
    points, labels = blobs(classes=4, per_class=25)
    merged = labels // 2  # 2 label groups, each the union of 2 separated clusters
    scores = cluster.cluster_scores(points, merged, num_clusters=4, normalize=False)
    assert 0.3 < scores["nmi"] < 0.9
    assert 0.2 < scores["ari"] < 0.9


def test_normalize_clusters_by_direction_not_length():
    """Two classes on two rays, each point near the origin or 50x further out: by direction
    they separate perfectly; raw Euclidean k-means splits by length instead."""
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 2
    direction = np.eye(2)[labels] + rng.normal(0, 0.05, size=(80, 2))
    length = np.where(rng.random(80) < 0.5, 1.0, 50.0)[:, None]
    points = direction * length
    assert cluster.cluster_scores(points, labels, normalize=True)["nmi"] == pytest.approx(1.0)
    assert cluster.cluster_scores(points, labels, normalize=False)["nmi"] < 0.8


def test_fewer_samples_than_clusters_is_a_clear_error():
    points, labels = blobs(classes=3, per_class=1)
    with pytest.raises(ValueError, match="k=5 clusters needs at least 5 samples"):
        cluster.cluster_scores(points, labels, num_clusters=5)
    with pytest.raises(ValueError, match="2 embeddings but 3 labels"):
        cluster.cluster_scores(points[:2], labels)


def test_subset_is_fixed_sorted_and_capped():
    a = cluster.subset(100, 10, seed=3)
    assert len(a) == 10 and len(set(a)) == 10 and list(a) == sorted(a)
    assert np.array_equal(a, cluster.subset(100, 10, seed=3))
    assert not np.array_equal(a, cluster.subset(100, 10, seed=4))
    assert np.array_equal(cluster.subset(5, None, seed=0), np.arange(5))
    assert np.array_equal(cluster.subset(5, 50, seed=0), np.arange(5))


# --------------------------------------------------------------------------------------------
# The map


def test_tsne_map_keeps_separated_clusters_apart():
    points, labels = blobs(classes=3, per_class=15, dim=32)
    flat = cluster.tsne_map(points, seed=0)
    assert flat.shape == (45, 2) and np.isfinite(flat).all()
    centres = np.stack([flat[labels == c].mean(axis=0) for c in range(3)])
    within = max(np.linalg.norm(flat[labels == c] - centres[c], axis=1).max() for c in range(3))
    between = min(
        np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i + 1, 3)
    )
    assert between > within  # the 2-D map still shows three groups


@pytest.mark.parametrize("classes", [4, 200])
def test_map_png_is_a_real_image_with_the_class_colours(tmp_path: Path, classes: int):
    points, labels = blobs(classes=classes, per_class=3, dim=2, spread=0.5)
    path = cluster.plot_map(
        points,
        labels,
        tmp_path / "sub" / "map.png",
        title="test map",
        class_names=[f"c{i}" for i in range(classes)],
    )
    assert path == tmp_path / "sub" / "map.png" and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (700, 700)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 5  # not blank
    colours = {tuple(p) for p in pixels.reshape(-1, 3)}
    expected = cluster._class_colours(np.arange(classes), classes)[:, :3] * 255
    found = sum(any(np.abs(np.array(c) - e).max() <= 2 for c in colours) for e in expected[:4])
    assert found == 4  # the first classes' colours are drawn


# --------------------------------------------------------------------------------------------
# The `evaluate` section of a row


GRID = """\
    name: clu
    experiment: kd-clu
    defaults:
      student: {{model: resnet18}}
      init: scratch
      data: {{dataset: imagefolder, root: {root}, img_size: 32, num_workers: 0}}
      train: {{epochs: 1, batch_size: 4}}
      evaluate: {evaluate}
      output_dir: {out}
    rows:
      - {{id: r, label: R}}
"""


def grid_file(tmp_path: Path, evaluate: str, root: str = "/nonexistent", name="g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        textwrap.dedent(GRID.format(root=root, evaluate=evaluate, out=tmp_path / "out"))
    )
    return path


def test_unknown_cluster_datasets_and_bad_values_are_errors_naming_the_key(tmp_path: Path):
    path = grid_file(
        tmp_path,
        "{cluster: {cfar10: /x, cub_dogs: /y, cub: 3}, tsne_samples: -1, checkpoint: first}",
    )
    with pytest.raises(GridError) as info:
        load_grid(path, check_data=False)
    problems = info.value.problems
    assert len(problems) == 5, problems
    where = f"{path}: row 'r' (R): evaluate."
    expected = {
        "cluster.cfar10": "unknown name 'cfar10' (did you mean 'evaluate.cluster.cifar10'?)",
        "cluster.cub_dogs": "unknown name 'cub_dogs'",
        "cluster.cub": "must be str, got 3",
        "tsne_samples": "must be >= 0",
        "checkpoint": "must be one of 'best', 'last'",
    }
    for key, message in expected.items():
        assert sum(p.startswith(where + key + ":") and message in p for p in problems) == 1, key
    assert "valid: cub, dogs, foodx, cifar10, fashion_mnist, imagefolder" in problems[0]


def test_evaluate_is_not_part_of_the_content_key(tmp_path: Path):
    """It decides what is measured after training, not what is trained: changing it (or moving
    a dataset copy) must not rerun finished rows."""
    plain = load_grid(grid_file(tmp_path, "{}", name="a.yaml"), check_data=False)
    measured = load_grid(
        grid_file(tmp_path, "{cluster: {cifar10: /c}, tsne_samples: 10}", name="b.yaml"),
        check_data=False,
    )
    assert plain.rows[0].key == measured.rows[0].key
    assert measured.rows[0].config.evaluate.cluster == {"cifar10": "/c"}


def test_smoke_maps_cluster_roots_to_generated_copies(tmp_path: Path):
    path = grid_file(tmp_path, "{cluster: {imagefolder: /real/if, cifar10: /real/cifar}}")
    row = load_grid(path, smoke=True).rows[0]
    smoke_data = tmp_path / "out-smoke" / "smoke-data"
    assert row.config.evaluate.cluster == {
        "imagefolder": str(smoke_data / "imagefolder"),
        "cifar10": str(smoke_data / "cifar10"),
    }
    assert row.config.data.root == str(smoke_data / "imagefolder")  # the training copy, shared
    prepare_smoke_data([row])
    assert (smoke_data / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    assert (smoke_data / "imagefolder" / "test").is_dir()


def test_clustering_sees_the_chosen_checkpoint_not_the_weights_in_memory(tmp_path: Path):
    from kd.data import generate_dataset
    from kd.models import build_model

    data = generate_dataset("imagefolder", tmp_path / "data", num_classes=3, image_size=32)
    rows = {}
    for choice in ("best", "last"):
        evaluate = f"{{cluster: {{imagefolder: {data.root}}}, checkpoint: {choice}}}"
        path = grid_file(tmp_path, evaluate, root=data.root, name=f"{choice}.yaml")
        rows[choice] = load_grid(path).rows[0]
    row = rows["best"]
    row.output_dir.mkdir(parents=True)
    torch.manual_seed(0)
    saved = {}
    for name in ("best.pt", "last.pt"):
        model = build_model("resnet18", num_classes=3)
        saved[name] = model.state_dict()
        torch.save({"model": model.state_dict(), "epoch": 0}, row.output_dir / name)
    in_memory = build_model("resnet18", num_classes=3)
    for choice, name in (("best", "best.pt"), ("last", "last.pt")):
        copy = cluster.clustered_weights(rows[choice], in_memory)
        assert copy is not in_memory and not copy.training
        assert all(torch.equal(v, saved[name][k]) for k, v in copy.state_dict().items()), choice
    assert not torch.equal(in_memory.conv1.weight, saved["best.pt"]["conv1.weight"])

    messages: list[str] = []
    metrics, images = cluster.evaluate_clustering(row, in_memory, log=messages.append)
    assert set(metrics) == {
        "cluster/imagefolder/nmi",
        "cluster/imagefolder/ari",
        "cluster/imagefolder/samples",
    }
    assert metrics["cluster/imagefolder/samples"] == 9  # 3 classes x 3 test images
    assert 0 <= metrics["cluster/imagefolder/nmi"] <= 1
    assert images == [row.output_dir / "cluster" / "imagefolder.png"]
    with Image.open(images[0]) as image:
        assert image.size == (700, 700)
    assert len(messages) == 1 and "cluster imagefolder: NMI" in messages[0]

    (row.output_dir / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="best.pt"):
        cluster.clustered_weights(row, in_memory)

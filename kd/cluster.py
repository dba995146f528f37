"""Clustering evaluation: how well a trained model's embedding space groups the classes.

For every dataset named in a row's `evaluate.cluster` (dataset name -> root of its copy), after
training:

1. the test split is embedded by the student, with the row's evaluation transform: the pooled
   pre-logit features, or the pooled output of `student.feature_layer` (the same embedding the
   KD terms see), from the weights of `best.pt` (`evaluate.checkpoint: best`, the default: the
   checkpoint the table reports) or `last.pt`;
2. k-means with k = the dataset's number of classes (scikit-learn, k-means++, 10 restarts, seed
   `train.seed`) clusters the embeddings, L2-normalised first unless `evaluate.normalize` is
   false, and the clusters are scored against the labels by NMI and ARI (scikit-learn's
   `normalized_mutual_info_score`, `adjusted_rand_score`: 1 is a perfect match, ~0 is chance);
3. a 2-D t-SNE map of at most `evaluate.tsne_samples` points (a fixed random subset: t-SNE's
   cost grows with the square of the count, ~2000 points take about a minute on a CPU)
   coloured by class is drawn as a PNG.

`evaluate.max_samples` caps the test images embedded and clustered (a fixed random subset;
None, the default, clusters the whole test split, as CUB's 5794 and CIFAR-10's 10000 images
are cheap to embed on a GPU). The row's MLflow run gets the metrics `cluster/<dataset>/nmi`,
`cluster/<dataset>/ari` and `cluster/<dataset>/samples` (at the last epoch's step) and the
artifact `cluster/<dataset>.png`; the PNGs are also kept in `<row dir>/cluster/`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Subset

from kd import data as D
from kd import rowfiles
from kd.evaluate import eval_transform, extract_embeddings
from kd.models import data_config

if TYPE_CHECKING:
    from kd.grid import Row


# --------------------------------------------------------------------------------------------
# Scores and maps on plain arrays
# --------------------------------------------------------------------------------------------


def _prepare(embeddings: Any, normalize: bool) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a [N, D] array, got shape {x.shape}")
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def cluster_scores(
    embeddings: Any,
    labels: Any,
    num_clusters: int | None = None,
    *,
    normalize: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """k-means (k = `num_clusters`, default the number of distinct labels) on `embeddings`
    [N, D], scored against `labels` [N]: {"nmi": ..., "ari": ...}."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    x = _prepare(embeddings, normalize)
    y = np.asarray(labels).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"{len(x)} embeddings but {len(y)} labels")
    k = int(num_clusters if num_clusters is not None else len(np.unique(y)))
    if not 1 <= k <= len(x):
        raise ValueError(
            f"k-means with k={k} clusters needs at least {k} samples, got {len(x)}; "
            "raise evaluate.max_samples (or leave it unset: the whole test split)"
        )
    predicted = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return {
        "nmi": float(normalized_mutual_info_score(y, predicted)),
        "ari": float(adjusted_rand_score(y, predicted)),
    }


def tsne_map(embeddings: Any, *, normalize: bool = True, seed: int = 0) -> np.ndarray:
    """A 2-D t-SNE embedding [N, 2] (PCA init; perplexity 30, lowered for small N)."""
    from sklearn.manifold import TSNE

    x = _prepare(embeddings, normalize)
    if len(x) < 4:
        raise ValueError(f"a t-SNE map needs at least 4 points, got {len(x)}")
    perplexity = min(30.0, (len(x) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(x.astype(np.float32))


def _class_colours(labels: np.ndarray, count: int) -> np.ndarray:
    from matplotlib import colormaps

    if count <= 10:
        return colormaps["tab10"](labels % 10)
    if count <= 20:
        return colormaps["tab20"](labels % 20)
    # Many classes (CUB's 200): golden-ratio steps through a wide colour map, so that classes
    # with neighbouring labels get distant colours.
    return colormaps["turbo"]((labels * 0.618034) % 1.0)


def plot_map(
    points: np.ndarray,
    labels: Any,
    path: str | Path,
    *,
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Scatter `points` [N, 2] coloured by class into a PNG at `path` (folders created)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = np.asarray(labels).reshape(-1).astype(int)
    count = len(class_names) if class_names is not None else int(y.max()) + 1
    figure = Figure(figsize=(7, 7), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    size = 40 if len(y) <= 200 else 8
    axes.scatter(points[:, 0], points[:, 1], c=_class_colours(y, count), s=size, linewidths=0)
    if count <= 20:  # a legend of 200 birds helps nobody
        from matplotlib.lines import Line2D

        colours = _class_colours(np.arange(count), count)
        names = class_names or [str(i) for i in range(count)]
        handles = [
            Line2D([], [], marker="o", linestyle="", color=colours[i], label=str(names[i]))
            for i in sorted(set(y.tolist()))
        ]
        axes.legend(handles=handles, fontsize=7, loc="best", framealpha=0.7)
    axes.set_title(title, fontsize=10)
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def subset(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a fixed random subset of at most `limit` of `count` items."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


# --------------------------------------------------------------------------------------------
# A row's clustering evaluation
# --------------------------------------------------------------------------------------------


def clustered_weights(row: Row, student: torch.nn.Module) -> torch.nn.Module:
    """A copy of `student` holding the weights of the row's `evaluate.checkpoint` file."""
    name = rowfiles.BEST if row.config.evaluate.checkpoint == "best" else rowfiles.LAST
    path = row.output_dir / name
    if not path.is_file():
        raise FileNotFoundError(
            f"row '{row.id}': clustering evaluates {path}, which does not exist"
        )
    model = copy.deepcopy(student)
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state)
    return model.eval()


def embed_test_split(
    row: Row,
    model: torch.nn.Module,
    dataset: str,
    root: str,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(embeddings [N, D], labels [N], class names) of a dataset's test split, at most
    `evaluate.max_samples` images, through the row's evaluation transform."""
    cfg = row.config
    spec = D.DatasetSpec(dataset, root)
    normal = data_config(model)
    transform = eval_transform(cfg, normal)
    split = D.load_split(spec, "test", transform=transform)
    chosen = subset(len(split), cfg.evaluate.max_samples, cfg.train.seed)
    loader = D.build_loader(
        Subset(split, chosen.tolist()),
        batch_size=cfg.train.batch_size,
        train=False,
        num_workers=cfg.data.num_workers,
    )
    embeddings, labels = extract_embeddings(
        model, loader, device=device, feature_layer=cfg.student.feature_layer
    )
    return embeddings.numpy(), labels.numpy(), list(split.classes)


def evaluate_clustering(
    row: Row,
    student: torch.nn.Module,
    *,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[dict[str, float], list[Path]]:
    """Every dataset of the row's `evaluate.cluster`: metrics by MLflow name, and the PNGs."""
    cfg = row.config
    options = cfg.evaluate
    model = clustered_weights(row, student).to(device)
    metrics: dict[str, float] = {}
    images: list[Path] = []
    for dataset, root in options.cluster.items():
        started = time.time()
        embeddings, labels, classes = embed_test_split(row, model, dataset, root, device)
        scores = cluster_scores(
            embeddings,
            labels,
            num_clusters=len(classes),
            normalize=options.normalize,
            seed=cfg.train.seed,
        )
        metrics[f"cluster/{dataset}/nmi"] = scores["nmi"]
        metrics[f"cluster/{dataset}/ari"] = scores["ari"]
        metrics[f"cluster/{dataset}/samples"] = float(len(labels))
        shown = subset(len(labels), options.tsne_samples, cfg.train.seed)
        if len(shown) >= 4:
            points = tsne_map(embeddings[shown], normalize=options.normalize, seed=cfg.train.seed)
            title = (
                f"{row.label} {row.id}: {dataset} test embeddings, t-SNE of {len(shown)} of "
                f"{len(labels)}\nk-means (k={len(classes)}) NMI {scores['nmi']:.3f} "
                f"ARI {scores['ari']:.3f} ({options.checkpoint} checkpoint)"
            )
            images.append(
                plot_map(
                    points,
                    labels[shown],
                    row.output_dir / rowfiles.CLUSTER_DIR / f"{dataset}.png",
                    title=title,
                    class_names=classes,
                )
            )
        log(
            f"[{row.id}] cluster {dataset}: NMI {scores['nmi']:.4f} ARI {scores['ari']:.4f} "
            f"({len(labels)} test images, k={len(classes)}, {time.time() - started:.1f}s)"
        )
    return metrics, images


def log_clustering(
    row: Row,
    student: torch.nn.Module,
    mlrun: Any,
    *,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """`evaluate_clustering`, recorded in the row's MLflow run (`kd.tracking.RowRun`, or None)
    at the last epoch's step; kd.train calls this once, after the last epoch."""
    metrics, images = evaluate_clustering(row, student, device=device, log=log)
    if mlrun is not None:
        mlrun.log_metrics(metrics, step=row.config.train.epochs)
        for path in images:
            mlrun.log_artifact(path, rowfiles.CLUSTER_DIR)
    return metrics

"""What happens to images between the loader and the model: timm's DeiT-style train and eval
transforms, normalisation (and random erasing) of uint8 batches on the training device, and
mixup/CutMix.

Importing this module fixes timm's RandAugment posterize for the Pillow installed
(`_posterize_at_least_one_bit`), before any transform is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image


def _posterize_at_least_one_bit(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    """timm's posterize, with the bit count clamped to Pillow's 1..8.

    timm 1.0.31's RandAugment with magnitude noise (`mstd`) can ask for 0 bits, which Pillow 13
    refuses ("bits must be between or equal to 1 and 8"): about 1 image in 700 would crash a real
    training run. 0 bits would mean a black image anyway; 1 bit is the strongest valid setting.
    """
    return _timm_posterize(img, max(1, int(bits_to_keep)), **kwargs)


def _patch_timm_posterize() -> None:
    import timm.data.auto_augment as auto_augment

    global _timm_posterize
    _timm_posterize = auto_augment.posterize
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_at_least_one_bit


_timm_posterize: Callable[..., Any]
_patch_timm_posterize()


def build_transforms(
    *,
    train: bool,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    hflip: float = 0.5,
    re_prob: float = 0.0,
    scale_min: float = 0.08,
    crop_pct: float = 0.875,
    crop_mode: str = "center",
    interpolation: str = "bicubic",
    uint8: bool = False,
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's DeiT-style pipeline, so our numbers match the papers' recipes.

    Train: random resized crop (area fraction `scale_min`..1), horizontal flip, RandAugment, optional random erasing.
    Eval: resize the short side to img_size / crop_pct then centre crop; with crop_mode='squash'
    both sides are resized to img_size / crop_pct (aspect ratio not kept) before the crop, so with
    crop_pct=1.0 the whole image is seen (what ConvNeXt uses at >= 384 px).

    `uint8`: stop at the uint8 [3, H, W] tensor and leave normalisation and random erasing to
    `BatchNormalize`, on the training device (what timm's prefetcher does).
    """
    if uint8 and re_prob > 0:
        raise ValueError(
            "build_transforms(uint8=True) leaves random erasing to BatchNormalize(re_prob=...); "
            "pass re_prob there, not here."
        )
    from timm.data import create_transform

    if crop_mode not in ("center", "squash", "border"):
        raise ValueError(f"crop_mode must be 'center', 'squash' or 'border', got {crop_mode!r}.")
    return create_transform(
        input_size=(3, img_size, img_size),
        is_training=train,
        auto_augment=auto_augment if train else None,
        hflip=hflip,
        scale=(scale_min, 1.0),
        re_prob=re_prob,
        re_mode="pixel",  # DeiT's random erasing fills with per-pixel noise
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        use_prefetcher=uint8,
    )


class BatchNormalize:
    """A uint8 batch from the loader -> the model's normalised float input, on the batch's own
    device, followed for training batches by DeiT's random erasing (per-pixel noise).

    Loader workers that stop at uint8 images (`build_transforms(uint8=True)`) skip the float
    conversion, normalisation and erasing (about 1 ms of ~10 per 384 px image on one core) and
    hand over a quarter of the bytes to collate, pin and copy to the GPU (0.44 MB per image
    instead of 1.77 MB); the GPU does the arithmetic in microseconds. Same values as
    `ToTensor` + `Normalize` up to float rounding: (x / 255 - mean) / std = (x - 255 mean) /
    (255 std). Random erasing draws from the training process's RNGs, which `seed_epoch`
    seeds, so a resumed run erases what the uninterrupted run erased.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], re_prob: float = 0.0) -> None:
        self.mean = torch.tensor([255.0 * m for m in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std]).view(1, 3, 1, 1)
        self.re_prob = re_prob
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, Any]] = {}

    def _for(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if device not in self._on_device:
            from timm.data.random_erasing import RandomErasing

            erase = (
                RandomErasing(self.re_prob, mode="pixel", device=device)
                if self.re_prob > 0
                else None
            )
            self._on_device[device] = (self.mean.to(device), self.std.to(device), erase)
        return self._on_device[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(
                f"BatchNormalize expects the uint8 batches of build_transforms(uint8=True), "
                f"got {images.dtype}."
            )
        mean, std, erase = self._for(images.device)
        batch = images.float().sub_(mean).div_(std)
        return erase(batch) if erase is not None else batch


class NormalizedBatches:
    """A loader of (uint8 images, targets) seen as one of normalised float images: each batch
    goes through `normalize` once it has reached its device. Everything else (len, dataset,
    batch_size, ...) is the wrapped loader's."""

    def __init__(self, loader: Any, normalize: BatchNormalize) -> None:
        self.loader = loader
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        for images, targets in self.loader:
            yield self.normalize(images), targets

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "normalize"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)


def build_mixup(
    num_classes: int, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """timm Mixup/CutMix on a batch (needs an even batch size; returns soft targets).

    None when both alphas are 0: then label smoothing, if any, belongs in the loss instead.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )

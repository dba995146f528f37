"""kd.models on tiny models and small images: names, smoke stand-ins, checkpoints, embeddings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.layers import GroupNormAct, StdConv2d

from kd import models
from kd.models import (
    ModelLoadError,
    build_model,
    check_model_name,
    count_params,
    data_config,
    embedding_dim,
    forward_with_embedding,
    freeze_teacher,
    is_distilled,
    load_state_file,
    smoke_model_name,
)

DEIT = "deit_tiny_distilled_patch16_224"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads; on a busy 2-core box OpenMP spinning costs 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class NotATensor:
    """A pickled object that weights_only=True must refuse."""


# --- names ---------------------------------------------------------------------------------


def test_check_model_name_accepts_known_architectures_and_tags() -> None:
    assert check_model_name("convnext_base") is None
    assert check_model_name("deit_base_distilled_patch16_384.fb_in1k") is None
    assert check_model_name("resnetv2_50x1_bit.goog_in21k_ft_in1k") is None


def test_check_model_name_suggests_close_names_for_typos() -> None:
    msg = check_model_name("convnext_bsae")
    assert msg is not None
    assert "unknown timm model 'convnext_bsae'" in msg
    assert "did you mean 'convnext_base'" in msg
    assert "timm.list_models()" in msg
    assert "did you mean" not in (check_model_name("qqqqqqqq") or "")


def test_check_model_name_reports_bad_tag_with_valid_tags() -> None:
    msg = check_model_name("deit_base_distilled_patch16_384.in21k")
    assert msg is not None
    assert "unknown pretrained tag 'in21k'" in msg
    assert "fb_in1k" in msg


def test_check_model_name_is_fast_after_first_call() -> None:
    check_model_name("resnet50")
    start = time.perf_counter()
    for _ in range(200):
        check_model_name("resnet50.a1_in1k")
    assert time.perf_counter() - start < 0.1


PAPER_MODELS = {
    "deit_base_distilled_patch16_384": "deit_tiny_distilled_patch16_224",
    "deit_base_distilled_patch16_384.fb_in1k": "deit_tiny_distilled_patch16_224",
    "deit_base_patch16_384": "deit_tiny_patch16_224",
    "convnext_base": "convnext_atto",
    "convnext_large.fb_in22k_ft_in1k": "convnext_atto",
    "resnetv2_50x1_bit": models.SMOKE_BIT,
    "resnetv2_101x1_bit.goog_in21k": models.SMOKE_BIT,
    "resnet50": "resnet18",
    "vit_small_patch16_224.dino": "vit_tiny_patch16_224",
    "efficientnet_b0.ra_in1k": "efficientnet_b0",
}


@pytest.mark.parametrize(("name", "tiny"), PAPER_MODELS.items())
def test_smoke_model_name_maps_paper_families(name: str, tiny: str) -> None:
    assert smoke_model_name(name) == tiny
    assert check_model_name(tiny) is None
    assert smoke_model_name(tiny) == tiny  # idempotent


def test_smoke_bit_is_a_bit() -> None:
    model = build_model(smoke_model_name("resnetv2_50x1_bit"), num_classes=3)
    assert isinstance(model.stem.conv, StdConv2d)
    assert any(isinstance(m, GroupNormAct) for m in model.modules())
    assert count_params(model) < 12_000_000
    assert data_config(model)["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(ModelLoadError, match="no pretrained weights"):
        timm.create_model(models.SMOKE_BIT, pretrained=True)


# --- building ------------------------------------------------------------------------------


def test_build_from_scratch_sets_classes_and_img_size() -> None:
    deit = build_model(DEIT, num_classes=7, img_size=32, drop_path_rate=0.1)
    assert deit.head.out_features == 7 and deit.head_dist.out_features == 7
    assert tuple(deit.patch_embed.grid_size) == (2, 2)
    assert data_config(deit)["input_size"] == (3, 32, 32)
    assert is_distilled(deit)
    cnn = build_model("convnext_atto", num_classes=5, img_size=32)  # img_size ignored by CNNs
    assert cnn(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    assert not is_distilled(cnn)
    assert count_params(cnn) == sum(p.numel() for p in cnn.parameters())


def test_build_rejects_bad_arguments_naming_the_row() -> None:
    where = "row 'x' (grids/t.yaml)"
    with pytest.raises(ModelLoadError, match=r"row 'x' \(grids/t.yaml\).*did you mean"):
        build_model("convnext_bsae", num_classes=2, where=where)
    with pytest.raises(ModelLoadError, match="needs a checkpoint"):
        build_model("resnet18", num_classes=2, source="file", where=where)
    with pytest.raises(ModelLoadError, match="unknown source"):
        build_model("resnet18", num_classes=2, source="imagenet", where=where)
    with pytest.raises(ModelLoadError, match="no pretrained weights for 'resnetv2_18x1_bit_smoke'"):
        build_model(models.SMOKE_BIT, num_classes=2, source="pretrained", where=where)
    with pytest.raises(ModelLoadError, match="unknown pretrained tag 'in21k'.*fb_in1k"):
        build_model("deit_tiny_patch16_224", num_classes=2, pretrained_tag="in21k", where=where)


def test_pretrained_source_asks_timm_for_the_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict]] = []

    def fake_create_model(name: str, **kwargs: object) -> str:
        calls.append((name, kwargs))
        return "model"

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    build_model(
        "deit_base_distilled_patch16_384",
        num_classes=200,
        img_size=384,
        source="pretrained",
        pretrained_tag="fb_in1k",
    )
    build_model("convnext_base.fb_in22k", num_classes=200, img_size=384, source="pretrained")
    assert calls == [
        (
            "deit_base_distilled_patch16_384.fb_in1k",
            {"pretrained": True, "num_classes": 200, "img_size": 384},
        ),
        ("convnext_base.fb_in22k", {"pretrained": True, "num_classes": 200}),
    ]


# --- checkpoints ---------------------------------------------------------------------------


def _save(state: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        path = path.with_suffix(".safetensors")
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "model":
        torch.save({"model": state, "epoch": 3, "args": {"lr": 1e-3}}, path)
    elif fmt == "state_dict_ema":
        torch.save({"state_dict_ema": state}, path)
    elif fmt == "ddp":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def deit_32() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A 10-class DeiT state at img 32 (grid 2x2) and the head a fresh 7-class model at 48 gets."""
    src = build_model(DEIT, num_classes=10, img_size=32)
    with torch.no_grad():
        src.pos_embed[:, :2] = torch.randn(1, 2, 192)  # cls and dist tokens
        src.pos_embed[:, 2:] = 0.25  # a constant grid stays constant when resampled
    torch.manual_seed(1)
    fresh_head = build_model(DEIT, num_classes=7, img_size=48).head.weight.detach().clone()
    return src.state_dict(), fresh_head


@pytest.mark.parametrize("fmt", ["model", "plain", "safetensors", "ddp", "state_dict_ema"])
def test_file_checkpoint_resamples_pos_embed_and_replaces_head(
    tmp_path: Path, fmt: str, deit_32: tuple[dict[str, torch.Tensor], torch.Tensor]
) -> None:
    src, fresh_head = deit_32
    path = _save(src, tmp_path / "ckpt.pth", fmt)
    torch.manual_seed(1)
    model = build_model(DEIT, num_classes=7, img_size=48, source="file", checkpoint=path)

    assert model.pos_embed.shape == (1, 2 + 9, 192)
    assert torch.equal(model.pos_embed[:, :2], src["pos_embed"][:, :2])
    assert torch.allclose(model.pos_embed[:, 2:], torch.full((1, 9, 192), 0.25), atol=1e-6)
    assert model.head.weight.shape == (7, 192) and model.head_dist.weight.shape == (7, 192)
    assert torch.equal(model.head.weight, fresh_head)  # fresh head kept, not the 10-class one
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.bias", "dist_token"):
        assert torch.equal(model.state_dict()[key], src[key]), key


def test_load_state_file_prefers_model_over_ema(tmp_path: Path) -> None:
    path = tmp_path / "both.pth"
    torch.save({"model": {"w": torch.ones(1)}, "state_dict_ema": {"w": torch.zeros(1)}}, path)
    assert torch.equal(load_state_file(path)["w"], torch.ones(1))


def test_row_checkpoint_needs_the_same_head(tmp_path: Path) -> None:
    src = build_model("convnext_atto", num_classes=10)
    path = tmp_path / "row.pth"
    torch.save({"model": src.state_dict(), "config": {"name": "teacher"}}, path)
    same = build_model(
        "convnext_atto", num_classes=10, source="row", checkpoint=path, trusted_checkpoint=True
    )
    assert torch.equal(same.head.fc.weight, src.head.fc.weight)
    with pytest.raises(
        ModelLoadError, match=r"(?s)row 's'.*head.fc.weight: checkpoint \[10, 320\].*same dataset"
    ):
        build_model("convnext_atto", num_classes=5, source="row", checkpoint=path, where="row 's'")


def test_wrong_architecture_lists_keys_and_names_file(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(build_model("resnet18", num_classes=10).state_dict(), path)
    where = "row 'deit_b_dist_hard' (grids/table2b.yaml)"
    with pytest.raises(ModelLoadError) as info:
        build_model(DEIT, num_classes=10, img_size=32, source="file", checkpoint=path, where=where)
    msg = str(info.value)
    assert where in msg and str(path) in msg
    assert "missing keys (" in msg and "blocks.0.attn.qkv.weight" in msg
    assert "unexpected keys (" in msg and "conv1.weight" in msg
    assert "more)" in msg  # long lists are cut with a count


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "convnext.pth"
    torch.save(build_model("convnext_atto", num_classes=3).state_dict(), path)
    model = build_model("convnext_femto", num_classes=3)
    with pytest.raises(
        ModelLoadError,
        match=r"shape mismatches \(126\): head.norm.bias: checkpoint \[320\] vs model \[384\]",
    ):
        models.load_checkpoint(model, path, source="file", trusted=False, where="")


@pytest.mark.parametrize("name", ["bad.pth", "bad.safetensors", "bad.pt"])
def test_corrupt_file_names_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "bad.pt":  # a real torch zip, truncated
        torch.save({"w": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(b"\x00garbage" * 20)
    with pytest.raises(ModelLoadError, match=f"cannot read checkpoint .*{name}"):
        load_state_file(path)
    with pytest.raises(ModelLoadError, match=f"row 'r': cannot read checkpoint .*{name}"):
        build_model("resnet18", num_classes=2, source="file", checkpoint=path, where="row 'r'")
    with pytest.raises(ModelLoadError, match="not found"):
        load_state_file(tmp_path / "missing.pth")


def test_pickled_objects_refused_unless_trusted(tmp_path: Path) -> None:
    path = tmp_path / "obj.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": NotATensor()}, path)
    with pytest.raises(ModelLoadError, match="(?s)obj.pth.*pickled Python objects"):
        load_state_file(path)
    assert torch.equal(load_state_file(path, trusted=True)["w"], torch.ones(2))


def test_file_without_state_dict_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelLoadError, match="no state dict.*epoch"):
        load_state_file(path)


# --- teacher and forward -------------------------------------------------------------------


def test_freeze_teacher() -> None:
    model = freeze_teacher(build_model("convnext_atto", num_classes=3).train())
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


FORWARD_MODELS = [DEIT, "convnext_atto", "resnet18", models.SMOKE_BIT]


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_forward_with_embedding_matches_model_in_eval(name: str) -> None:
    model = build_model(name, num_classes=5, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = forward_with_embedding(model, x)
        ref_logits = model(x)
        ref_emb = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.equal(out.logits, ref_logits)
    assert torch.equal(out.dist_logits, ref_logits)
    assert torch.allclose(out.embedding, ref_emb, atol=1e-6)
    assert out.embedding.shape == (2, embedding_dim(model))


def test_distilled_deit_gives_two_heads_in_training() -> None:
    model = build_model(DEIT, num_classes=5, img_size=32).train()
    x = torch.randn(2, 3, 32, 32)
    out = forward_with_embedding(model, x)
    tokens = model.forward_features(x)
    assert torch.allclose(out.logits, model.head(tokens[:, 0]), atol=1e-6)
    assert torch.allclose(out.dist_logits, model.head_dist(tokens[:, 1]), atol=1e-6)
    assert torch.allclose(out.embedding, (tokens[:, 0] + tokens[:, 1]) / 2, atol=1e-6)
    out.logits.sum().backward()  # gradients flow through the one pass

    model.set_distilled_training(False)  # the caller's choice is kept: timm's mean of both heads
    mean = forward_with_embedding(model, x)
    assert torch.equal(mean.logits, mean.dist_logits)


def test_feature_layer_hook_pools_the_named_layer() -> None:
    cnn = build_model("resnet18", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = forward_with_embedding(cnn, x, feature_layer="layer3")
        ref = cnn.layer3(cnn.layer2(cnn.layer1(cnn.maxpool(cnn.act1(cnn.bn1(cnn.conv1(x)))))))
    assert torch.allclose(out.embedding, ref.mean(dim=(2, 3)), atol=1e-5)
    assert torch.equal(out.logits, cnn(x))
    assert embedding_dim(cnn, feature_layer="layer3") == 256

    deit = build_model(DEIT, num_classes=5, img_size=32).eval()
    with torch.no_grad():
        tokens = forward_with_embedding(deit, x, feature_layer="blocks.11")
    assert tokens.embedding.shape == (2, 192)
    with pytest.raises(ValueError, match="unknown feature_layer 'layer9'.*layer"):
        forward_with_embedding(cnn, x, feature_layer="layer9")


def test_data_config_differs_between_families() -> None:
    bit = data_config(build_model(models.SMOKE_BIT, num_classes=2))
    deit = data_config(build_model(DEIT, num_classes=2, img_size=48))
    assert bit["mean"] != deit["mean"]
    assert deit["input_size"] == (3, 48, 48)
    assert {"mean", "std", "interpolation", "crop_pct"} <= deit.keys()

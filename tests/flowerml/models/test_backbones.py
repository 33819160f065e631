"""flowerml.models.backbones: architectures, loading a state dict into the backbone, strategies (weight
sources are tested in test_weights.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from flowerml.models.backbones import (
    ARCHS,
    STRATEGIES,
    FlowerModel,
    ModelError,
    backbone_stages,
    build_model,
    freeze_stages,
    load_backbone_state,
    num_stages,
    parameter_groups,
    prepare_for_strategy,
)
from flowerml.models.weights import resolve_weights
from tests.helpers.backbones import (
    assert_backbone_equals,
    save_pth,
    source_resnet18,
)

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
                "resnet152": 2048, "alexnet": 4096, "vgg16": 4096, "vgg19": 4096,
                "mobilenet_v3_large": 1280, "mobilenet_v3_small": 1024, "efficientnet_b0": 1280}
STAGES = {"resnet18": 5, "resnet152": 5, "alexnet": 4, "vgg16": 6, "vgg19": 6,
          "mobilenet_v3_large": 6, "mobilenet_v3_small": 6, "efficientnet_b0": 5}


# --------------------------------------------------------------------------------------------
# Architectures


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_with_feature_dim_and_stages(arch: str) -> None:
    # On the meta device: the layers and their shapes without initialising 138M parameters
    # (VGG); the initialisation itself is checked on real tensors below.
    with torch.device("meta"):
        model = build_model(arch, 5, seed=0)
    assert isinstance(model, FlowerModel)
    assert (model.arch, model.num_classes, model.feature_dim) == (arch, 5, FEATURE_DIMS[arch])
    assert model.head.in_features == FEATURE_DIMS[arch] and model.head.out_features == 5
    assert len(backbone_stages(model)) == num_stages(arch)
    if arch in STAGES:
        assert num_stages(arch) == STAGES[arch]


@pytest.mark.parametrize("arch", ["resnet18", "alexnet"])
def test_forward_and_features_shapes(arch: str) -> None:
    model = build_model(arch, 3, seed=0).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(images).shape == (2, 3)
        assert model.features(images).shape == (2, FEATURE_DIMS[arch])


def test_seed_makes_init_reproducible_and_spares_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model("resnet18", 4, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model("resnet18", 4, seed=1)
    c = build_model("resnet18", 4, seed=2)
    assert torch.equal(a.head.weight, b.head.weight)
    assert torch.equal(a.backbone.conv1.weight, b.backbone.conv1.weight)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_unknown_arch_and_bad_num_classes() -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet9", 10)
    assert "--arch must be one of resnet18, resnet34" in str(info.value)
    assert "vgg19" in str(info.value) and "'resnet9'" in str(info.value)
    with pytest.raises(ModelError, match="--arch"):
        num_stages("resnet9")
    with pytest.raises(ModelError, match="num_classes"):
        build_model("resnet18", 0)


# --------------------------------------------------------------------------------------------
# Loading a state dict into the backbone (where weights come from: test_weights.py)


def test_vgg_family_drops_only_the_final_classifier() -> None:
    # In memory: an AlexNet file would be 244 MB of disk I/O for the same code path.
    torch.manual_seed(5)
    source = torchvision.models.alexnet(weights=None)
    model = build_model("alexnet", 7)
    load_backbone_state(model, source.state_dict(), "alexnet.pth")
    backbone = model.backbone.state_dict()
    assert "classifier.4.weight" in backbone and "classifier.6.weight" not in backbone
    for key, tensor in backbone.items():
        assert torch.equal(tensor, source.state_dict()[key]), key


def test_wrong_arch_state_dicts_name_a_key(tmp_path: Path) -> None:
    source = source_resnet18()
    state = source.state_dict()
    resnet18 = save_pth(state, tmp_path / "r18.pth")
    with pytest.raises(ModelError) as info:
        build_model("resnet34", 10, weights=resolve_weights(str(resnet18), "resnet34"))
    message = str(info.value)
    assert str(resnet18) in message and "resnet34" in message
    assert "missing key 'layer1.2.conv1.weight'" in message

    model = build_model("resnet18", 10)
    # resnet34 holds every resnet18 key with the same shape, plus more blocks: still refused.
    with pytest.raises(ModelError, match="unexpected key 'layer1.2.conv1.weight'"):
        load_backbone_state(model, torchvision.models.resnet34().state_dict(), "r34.pth")
    reshaped = dict(state)
    reshaped["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)  # as in a resnet50
    with pytest.raises(ModelError, match=r"'layer1.0.conv1.weight' has shape \[64, 64, 1, 1\]"):
        load_backbone_state(model, reshaped, "r50.pth")
    not_tensor = {**state, "bn1.weight": [1.0]}
    with pytest.raises(ModelError, match="'bn1.weight' holds a list"):
        load_backbone_state(model, not_tensor, "odd.pth")
    partial = dict(state)
    del partial["layer4.1.bn2.weight"]
    with pytest.raises(ModelError, match="missing key 'layer4.1.bn2.weight'"):
        load_backbone_state(model, partial, "partial.pth")
    # Checkpoints older than BatchNorm's counter still load.
    old = {k: v for k, v in state.items()
           if not k.endswith("num_batches_tracked")}
    load_backbone_state(model, old, "old.pth")
    assert_backbone_equals(model, source)


# --------------------------------------------------------------------------------------------
# Strategies


def bn_layers(modules: list[nn.Module]) -> list[nn.BatchNorm2d]:
    return [m for root in modules for m in root.modules() if isinstance(m, nn.BatchNorm2d)]


def test_freeze_stages_locks_params_and_keeps_frozen_bn_in_eval() -> None:
    model = build_model("resnet18", 10, seed=0)
    freeze_stages(model, 2)  # stem and layer1
    stages = backbone_stages(model)
    frozen = [p for stage in stages[:2] for m in stage for p in m.parameters()]
    trainable = [p for stage in stages[2:] for m in stage for p in m.parameters()]
    assert frozen and all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in trainable)
    assert all(p.requires_grad for p in model.head.parameters())
    assert not model.backbone.conv1.weight.requires_grad
    assert not model.backbone.layer1[0].conv1.weight.requires_grad
    assert model.backbone.layer2[0].conv1.weight.requires_grad

    model.train()
    assert all(not bn.training for bn in bn_layers(stages[0] + stages[1]))
    assert all(bn.training for bn in bn_layers(stages[2] + stages[3]))
    frozen_bn = model.backbone.bn1
    mean_before = frozen_bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(frozen_bn.running_mean, mean_before)  # frozen BN statistics unchanged

    model.train(False)
    assert not any(m.training for m in model.modules())
    model.train(True)
    assert model.training and not model.backbone.bn1.training

    freeze_stages(model, 0)  # unfreezes again
    assert all(p.requires_grad for p in model.parameters())
    assert all(bn.training for bn in bn_layers([model.backbone]))


def test_freeze_all_stages_of_vgg_freezes_the_whole_backbone() -> None:
    model = build_model("alexnet", 4, seed=0)
    stages = backbone_stages(model)
    assert len(stages) == 4
    assert sum(isinstance(m, nn.MaxPool2d) for stage in stages[:3] for m in stage) == 3
    freeze_stages(model, 4)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.train()
    dropout = [m for m in model.backbone.modules() if isinstance(m, nn.Dropout)]
    assert dropout and not any(m.training for m in dropout)  # a frozen extractor is fixed
    assert model.head.training


@pytest.mark.parametrize(("arch", "bad", "high"), [("resnet18", 6, 5), ("resnet18", -1, 5),
                                                   ("alexnet", 5, 4)])
def test_freeze_out_of_range_names_option_and_range(arch: str, bad: int, high: int) -> None:
    model = build_model(arch, 4)
    with pytest.raises(ModelError) as info:
        freeze_stages(model, bad)
    assert f"--freeze-stages must be between 0 and {high} for {arch}" in str(info.value)


def test_parameter_groups_finetune() -> None:
    model = build_model("resnet18", 10, seed=0)
    prepare_for_strategy(model, "finetune", freeze=1)
    groups = parameter_groups(model, strategy="finetune", lr=0.1, backbone_lr_factor=0.1,
                              weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert by_name["backbone"]["lr"] == pytest.approx(0.01)
    assert by_name["backbone_no_decay"]["lr"] == pytest.approx(0.01)
    assert by_name["head"]["lr"] == 0.1 and by_name["head_no_decay"]["lr"] == 0.1
    assert by_name["head"]["params"] == [model.head.weight]
    assert by_name["head_no_decay"]["params"] == [model.head.bias]
    assert by_name["backbone"]["weight_decay"] == 1e-4 and by_name["head"]["weight_decay"] == 1e-4
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0

    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    all_ids = [i for group in ids.values() for i in group]
    assert len(all_ids) == len(set(all_ids))  # no parameter twice
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(all_ids) == trainable
    assert id(model.backbone.conv1.weight) not in trainable  # frozen stem excluded
    assert id(model.backbone.bn1.weight) not in trainable
    bn = model.backbone.layer1[0].bn1
    assert {id(bn.weight), id(bn.bias)} <= ids["backbone_no_decay"]
    assert id(model.backbone.layer1[0].conv1.weight) in ids["backbone"]
    assert all(p.ndim > 1 for p in by_name["backbone"]["params"])
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # the groups are valid optimiser input


def test_parameter_groups_linear_probe_trains_only_the_head() -> None:
    model = build_model("resnet18", 10, seed=0)
    groups = parameter_groups(model, strategy="linear-probe", lr=1e-3, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["head", "head_no_decay"]
    assert all(g["lr"] == 1e-3 for g in groups)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == [model.head.weight, model.head.bias]
    assert model.frozen_stages == num_stages("resnet18")
    model.train()
    assert not any(m.training for m in bn_layers([model.backbone]))


def test_prepare_for_strategy_validates() -> None:
    model = build_model("resnet18", 10)
    with pytest.raises(ModelError) as info:
        prepare_for_strategy(model, "distill")
    assert "--strategy must be one of finetune, linear-probe: got 'distill'" in str(info.value)
    with pytest.raises(ModelError, match="--strategy must be one of"):
        parameter_groups(model, strategy="feature-extract", lr=0.1)
    with pytest.raises(ModelError, match="--freeze-stages"):
        prepare_for_strategy(model, "linear-probe", freeze=2)
    with pytest.raises(ModelError, match="--lr"):
        parameter_groups(model, strategy="finetune", lr=0.0)
    prepare_for_strategy(model, "linear-probe")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    prepare_for_strategy(model, "finetune", freeze=0)
    assert all(p.requires_grad for p in model.parameters())
    assert STRATEGIES == ("finetune", "linear-probe")


# --------------------------------------------------------------------------------------------
# Mobile students: MobileNetV3-Large and -Small, EfficientNet-B0


@pytest.mark.parametrize(("arch", "cuts"), [
    # features children starting each stage: a new stage where the resolution halves.
    ("mobilenet_v3_large", [0, 2, 4, 7, 13]),
    ("mobilenet_v3_small", [0, 1, 2, 4, 9]),
    ("efficientnet_b0", [0, 2, 3, 4, 6]),
])
def test_mobile_stages_are_cut_where_the_resolution_halves(arch: str, cuts: list[int]) -> None:
    model = build_model(arch, 4, seed=0)
    stages = backbone_stages(model)
    features = list(model.backbone.features)
    starts = [features.index(stage[0]) for stage in stages if stage[0] in features]
    assert starts == cuts
    images = torch.randn(1, 3, 64, 64)
    sizes = []
    for stage in stages[:len(cuts)]:
        for layer in stage:
            images = layer(images)
        sizes.append(images.shape[-1])
    assert sizes == [32, 16, 8, 4, 2]  # each stage halves the resolution once
    # MobileNetV3 keeps a 960 -> 1280 (Small: 576 -> 1024) layer before the head: one more
    # stage to freeze; EfficientNet keeps only a Dropout, which has nothing to freeze.
    assert len(stages) == len(cuts) + arch.startswith("mobilenet_v3")


def test_freezing_a_mobile_student_keeps_its_frozen_batchnorm_fixed() -> None:
    model = build_model("efficientnet_b0", 4, seed=0)
    freeze_stages(model, 3)
    stages = backbone_stages(model)
    assert all(not p.requires_grad for stage in stages[:3] for m in stage
               for p in m.parameters())
    assert all(p.requires_grad for stage in stages[3:] for m in stage for p in m.parameters())
    model.train()
    assert all(not bn.training for bn in bn_layers(stages[0] + stages[1] + stages[2]))
    assert all(bn.training for bn in bn_layers(stages[3]))
    groups = parameter_groups(model, strategy="finetune", lr=0.1)
    trained = {id(p) for group in groups for p in group["params"]}
    assert not any(id(p) in trained for m in stages[0] for p in m.parameters())
    with pytest.raises(ModelError, match="between 0 and 5 for efficientnet_b0"):
        freeze_stages(model, 6)


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0"])
def test_a_staged_torchvision_file_loads_into_a_mobile_backbone(arch: str,
                                                                tmp_path: Path) -> None:
    """The same rule as `train --weights`: torchvision's state dict, its ImageNet classifier
    dropped, every other key loaded strictly; a 32 px image goes through."""
    torch.manual_seed(11)
    source = torchvision.models.get_model(arch, weights=None)
    path = save_pth(source.state_dict(), tmp_path / f"{arch}.pth")
    model = build_model(arch, 3, weights=resolve_weights(str(path), arch), seed=0)
    expected = source.state_dict()
    dropped = f"classifier.{len(source.classifier) - 1}."
    backbone = model.backbone.state_dict()
    assert set(backbone) == {k for k in expected if not k.startswith(dropped)}
    assert all(torch.equal(tensor, expected[key]) for key, tensor in backbone.items())
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    other = "efficientnet_b0" if arch == "mobilenet_v3_large" else "mobilenet_v3_large"
    with pytest.raises(ModelError, match=f"does not fit {other}"):
        build_model(other, 3, weights=resolve_weights(str(path), other))


def test_mobile_imagenet_weights_are_pinned_by_name() -> None:
    from flowerml.models.weights import imagenet_file_name, imagenet_weights_name

    assert imagenet_weights_name("mobilenet_v3_large") == "MobileNet_V3_Large_Weights.IMAGENET1K_V2"
    assert imagenet_weights_name("mobilenet_v3_small") == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert imagenet_weights_name("efficientnet_b0") == "EfficientNet_B0_Weights.IMAGENET1K_V1"
    # torchvision's file names carry their sha256 prefix: a staged copy is checked against it.
    assert imagenet_file_name("mobilenet_v3_large") == "mobilenet_v3_large-5c1a4163.pth"
    assert imagenet_file_name("mobilenet_v3_small") == "mobilenet_v3_small-047dcff4.pth"
    assert imagenet_file_name("efficientnet_b0") == "efficientnet_b0_rwightman-7f5810bc.pth"

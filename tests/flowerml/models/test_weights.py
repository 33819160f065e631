"""flowerml.models.weights: `--weights` resolved to a verified local file (files, S3, ImageNet offline)
before any model is built, and loaded into the backbone."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import pytest
import torch

from flowerml.data.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    default_preprocessing,
)
from flowerml.models import weights
from flowerml.models.backbones import FlowerModel, ModelError, build_model
from flowerml.models.weights import ResolvedWeights, WeightsUnavailable, resolve_weights
from tests.helpers.backbones import (
    assert_backbone_equals,
    assert_fresh_head,
    save_pth,
    source_resnet18,
)
from tests.helpers.network import free_port
from tests.helpers.preprocessing import (
    evaluated_tensor,
    photo_variants,
    served_tensor,
    torchvision_tensor,
)


def build(arch: str, num_classes: int, value: str, *, seed: int | None = None,
          cache_dir: Path | None = None, s3=None) -> FlowerModel:
    """What training does: resolve `--weights` first, then build the model from it."""
    resolved = resolve_weights(value, arch, cache_dir=cache_dir, s3=s3)
    return build_model(arch, num_classes, weights=resolved, seed=seed)


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """The seeded torchvision ResNet-18 a staged file holds (tests/helpers/backbones.py), built
    once for the module: the tests read it, never change it."""
    return source_resnet18()


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_staged_file_loads_backbone_exactly_with_fresh_head(tmp_path: Path, suffix: str,
                                                          source: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    path = tmp_path / f"r18{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        save_pth(source.state_dict(), path)
    model = build("resnet18", 10, str(path), seed=0)
    assert_backbone_equals(model, source)
    assert_fresh_head(model, source, 10)
    assert model.weights_source == str(path)
    # Same head as a model with no weights and the same seed: the head is never loaded.
    assert torch.equal(model.head.weight, build_model("resnet18", 10, seed=0).head.weight)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module", "flowermodel"])
def test_wrapped_and_flowermodel_state_dicts(tmp_path: Path, wrap: str,
                                             source: torch.nn.Module) -> None:
    state = source.state_dict()
    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "flowermodel":
        trained = build_model("resnet18", 4, seed=3)
        trained.backbone.load_state_dict({k: v for k, v in state.items()
                                          if not k.startswith("fc.")})
        state = trained.state_dict()
    else:
        state = {wrap: state, "epoch": 3}
    model = build("resnet18", 6, str(save_pth(state, tmp_path / "w.pth")), seed=0)
    assert_backbone_equals(model, source)
    assert model.head.weight.shape == (6, 512)


def test_weights_from_s3(tmp_path: Path, s3_bucket: str, s3_options, moto_endpoint: str,
                        source: torch.nn.Module) -> None:
    import boto3

    path = save_pth(source.state_dict(), tmp_path / "r18.pth")
    boto3.client("s3", endpoint_url=moto_endpoint).upload_file(str(path), s3_bucket,
                                                               "weights/r18.pth")
    uri = f"s3://{s3_bucket}/weights/r18.pth"
    model = build("resnet18", 10, uri, s3=s3_options, seed=0)
    assert_backbone_equals(model, source)
    assert_fresh_head(model, source, 10)
    assert model.weights_source == uri

    cache = tmp_path / "cache"
    cached = build("resnet18", 10, uri, s3=s3_options, cache_dir=cache)
    assert_backbone_equals(cached, source)
    assert (cache / "weights" / s3_bucket / "weights" / "r18.pth").is_file()
    build("resnet18", 10, uri, s3=s3_options, cache_dir=cache)  # reuses the copy

    with pytest.raises(ModelError, match="no such object"):
        build("resnet18", 10, f"s3://{s3_bucket}/weights/absent.pth",
                    s3=s3_options)


class Payload:
    """Anything that is not a tensor: weights_only loading must refuse to build it."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran() -> Payload:
    Payload.ran = True
    return Payload()


def test_pickled_object_is_refused_not_executed(tmp_path: Path) -> None:
    path = save_pth({"conv1.weight": Payload()}, tmp_path / "evil.pth")
    Payload.ran = False
    with pytest.raises(ModelError) as info:
        build("resnet18", 10, str(path))
    assert not Payload.ran
    message = str(info.value)
    assert str(path) in message and "cannot be loaded" in message
    assert "pickled object" in message and "_mark_ran" in message
    assert "weights_only` set to `False" not in message  # no advice to load unsafely


def test_bad_weights_sources(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "r18.pth"
    with pytest.raises(ModelError, match=str(missing)):
        build("resnet18", 10, str(missing))
    text = tmp_path / "r18.txt"
    text.write_text("hello")
    with pytest.raises(ModelError, match="safetensors"):
        build("resnet18", 10, str(text))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="cannot be loaded"):
        build("resnet18", 10, str(garbage))
    not_a_dict = save_pth([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ModelError, match="not a state dict"):
        build("resnet18", 10, str(not_a_dict))
    with pytest.raises(ModelError, match="s3://bucket/key"):
        build("resnet18", 10, "s3://only-bucket")
    with pytest.raises(ModelError, match="invalid object key"):
        build("resnet18", 10, "s3://bucket/../escape.pth", cache_dir=tmp_path)


def test_staged_torchvision_file_is_hash_checked(tmp_path: Path, source: torch.nn.Module) -> None:
    # The name torchvision downloads resnet18 to; its content here is not the real file.
    fake = save_pth(source.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    with pytest.raises(ModelError, match="sha256"):
        build("resnet18", 10, str(fake))


def test_imagenet_without_network_explains_how_to_stage(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # torch.hub downloads with urllib.request.urlopen, whose shared opener keeps the proxies of
    # its first use for the life of the process: this test's opener must not outlive it (a
    # later urlopen to 127.0.0.1 in this worker would go to the dead proxy).
    monkeypatch.setattr(urllib.request, "_opener", None)
    proxy = f"http://127.0.0.1:{free_port()}"  # refused at once, no DNS wait
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(WeightsUnavailable) as info:
        build("resnet18", 10, "imagenet")
    message = str(info.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "hub/checkpoints" in message and "TORCH_HOME" in message
    assert "--weights /path/to/resnet18-f37072fd.pth" in message
    assert "--weights s3://bucket/resnet18-f37072fd.pth" in message


def test_imagenet_uses_a_staged_hub_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         source: torch.nn.Module) -> None:
    """A file already in $TORCH_HOME/hub/checkpoints is used without any network access."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    staged = save_pth(source.state_dict(), checkpoints / "resnet18-f37072fd.pth")

    # Our stand-in cannot match the real file's hash, so it is refused as damaged...
    with pytest.raises(WeightsUnavailable, match="is damaged: delete it") as info:
        build("resnet18", 10, "imagenet")
    assert str(staged) in str(info.value)

    # ...and loads once the expected hash is the stand-in's own.
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    monkeypatch.setattr(weights, "_torchvision_file_hashes",
                        lambda: {"resnet18-f37072fd.pth": digest[:8]})
    model = build("resnet18", 10, "imagenet")
    assert_backbone_equals(model, source)
    assert model.weights_source == "imagenet:ResNet18_Weights.IMAGENET1K_V1"


def test_resolution_happens_before_any_model_is_built(tmp_path: Path,
                                                       source: torch.nn.Module) -> None:
    from flowerml.models.weights import NO_WEIGHTS

    assert resolve_weights(" None ", "resnet18") == NO_WEIGHTS
    assert NO_WEIGHTS.state_dict() is None
    path = save_pth(source.state_dict(), tmp_path / "r18.pth")
    resolved = resolve_weights(str(path), "resnet18")
    assert (resolved.file, resolved.source) == (path, str(path))
    with pytest.raises(ModelError, match="--arch must be one of"):
        resolve_weights("none", "resnet9")
    with pytest.raises(ModelError, match="no such file"):
        resolve_weights(str(tmp_path / "absent.pth"), "resnet18")
    with pytest.raises(ModelError, match="--weights must be none, imagenet"):
        resolve_weights("  ", "resnet18")


def test_a_plain_pickle_is_refused_without_torchs_protocol_warning(tmp_path: Path) -> None:
    """torch warns about a pickle's protocol on stderr before refusing it: two lines of noise
    above the one line that matters."""
    import pickle
    import warnings

    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps({"weights": [1.0]}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(weights.WeightsError, match="not a torch weights file"):
            weights.load_weights_file(path)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize(("value", "message"), [
    ("ftp://mirror/w.pth", "--weights ftp://mirror/w.pth: the scheme 'ftp' is not supported: "
                           "give none, imagenet, a file path, file://PATH or s3://bucket/key"),
    ("HTTPS://host/w.pth", "the scheme 'HTTPS' is not supported"),
    ("", "--weights must be none, imagenet, a file path, file://PATH or s3://bucket/key"),
])
def test_a_weights_value_of_no_accepted_form(value: str, message: str) -> None:
    for check in (lambda: resolve_weights(value, "resnet18"),
                  lambda: weights.check_weights_value(value, "resnet18")):
        with pytest.raises(weights.WeightsError) as info:
            check()
        assert message in str(info.value)


def test_weights_that_are_not_a_regular_file_say_what_they_are(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "w.pth"
    os.mkfifo(fifo)  # reading it would block until a writer came
    folder = tmp_path / "d.pth"
    folder.mkdir()
    for path, kind in ((fifo, "a named pipe"), (folder, "a folder")):
        with pytest.raises(weights.WeightsError) as info:
            resolve_weights(str(path), "resnet18")
        assert str(info.value) == f"--weights {path}: {path} is not a regular file ({kind})"


def test_weights_are_fitted_to_the_arch_up_front_without_building_it(tmp_path: Path) -> None:
    """`check_weights_value` makes `build_model`'s checks on a storage-less model: what it
    accepts loads, what it refuses is refused for the same reason."""
    import torchvision

    good = save_pth(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    weights.check_weights_value(str(good), "resnet18")
    build("resnet18", 10, str(good))
    wrong = save_pth({"conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(ModelError) as up_front:
        weights.check_weights_value(str(wrong), "resnet18")
    with pytest.raises(ModelError) as at_build:
        build("resnet18", 10, str(wrong))
    assert str(up_front.value) == str(at_build.value)
    assert "key 'conv1.weight' has shape [64, 3, 3, 3], resnet18 needs [64, 3, 7, 7]" in \
        str(up_front.value)


# --------------------------------------------------------------------------------------------
# The weights' own preprocessing (read from torchvision's enum: no weights are loaded)


def test_resnet152_v2_weights_are_evaluated_at_232_px() -> None:
    assert weights.preprocessing_for("ResNet152_Weights.IMAGENET1K_V2", 224) == Preprocessing(
        resize=232, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
    efficientnet = weights.preprocessing_for("EfficientNet_B0_Weights.IMAGENET1K_V1", 224)
    assert (efficientnet.resize, efficientnet.interpolation) == (256, "bicubic")
    # Another training size keeps the weights' resize-to-crop ratio: 232 / 224 at 112 px.
    assert weights.preprocessing_for("ResNet152_Weights.IMAGENET1K_V2", 112).resize == 116


def test_no_weights_keep_todays_preprocessing() -> None:
    for size in (224, 96, 32):
        assert weights.preprocessing_for(None, size) == default_preprocessing(size)
        assert weights.preprocessing_for("none", size) == default_preprocessing(size)
    assert default_preprocessing(224) == Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    assert weights.weights_preprocessing(weights.NO_WEIGHTS, 224) == default_preprocessing(224)


def test_the_preprocessing_follows_what_weights_resolved_to(tmp_path: Path) -> None:
    imagenet = ResolvedWeights("imagenet:ResNet152_Weights.IMAGENET1K_V2",
                               tmp_path / "resnet152-f82ba261.pth")
    assert weights.weights_preprocessing(imagenet, 224).resize == 232
    # A staged copy of torchvision's file (S3 or local) is known by its name...
    staged = ResolvedWeights("s3://bucket/resnet152-f82ba261.pth",
                             tmp_path / "resnet152-f82ba261.pth")
    assert weights.weights_preprocessing(staged, 224).resize == 232
    # ...and weights of unknown origin keep today's values.
    own = ResolvedWeights("/data/my-backbone.safetensors", tmp_path / "my-backbone.safetensors")
    assert weights.weights_preprocessing(own, 224) == default_preprocessing(224)


def test_the_expected_preprocessing_is_judged_from_the_weights_value_alone() -> None:
    """What work done ahead of training decodes for: nothing is fetched (no such file
    exists here), the value's form and name decide."""
    expected = weights.expected_preprocessing
    assert expected("none", "resnet152", 112) == default_preprocessing(112)
    assert expected("imagenet", "resnet152", 224) == \
        weights.preprocessing_for("ResNet152_Weights.IMAGENET1K_V2", 224)
    assert expected("imagenet", "resnet152", 224).resize == 232
    for named in ("s3://bucket/weights/resnet152-f82ba261.pth",
                  "file:///nowhere/resnet152-f82ba261.pth", "/nowhere/resnet152-f82ba261.pth"):
        assert expected(named, "resnet152", 224).resize == 232, named
    assert expected("/nowhere/my-backbone.safetensors", "resnet152", 224) == \
        default_preprocessing(224)
    with pytest.raises(weights.WeightsError, match="scheme 'ftp' is not"):
        expected("ftp://host/resnet152-f82ba261.pth", "resnet152", 224)


def test_an_unknown_weights_name_is_refused() -> None:
    with pytest.raises(weights.WeightsError, match="'ResNet152_Weights.NOPE' names no "
                                                   "torchvision weights"):
        weights.preprocessing_for("ResNet152_Weights.NOPE", 224)


@pytest.mark.parametrize("weights_name", ["ResNet152_Weights.IMAGENET1K_V2",
                                          "EfficientNet_B0_Weights.IMAGENET1K_V1",
                                          "ResNet18_Weights.IMAGENET1K_V1"])
def test_flowerml_gives_torchvisions_own_input_for_the_weights(tmp_path: Path,
                                                               weights_name: str) -> None:
    """The same JPEGs through `weights.transforms()` and through flowerml's evaluation (decode
    cache + eval transform) and serving (`image_pixels`) paths, normalised: the same tensor.
    Photos under twice the resize match to a grey level; a larger one is decoded at half scale
    by libjpeg (flowerml's speed-up), which moves pixels a little, never the picture."""
    preprocessing = weights.preprocessing_for(weights_name, 224)
    one_grey_level = 1 / 255 / min(IMAGENET_STD)
    for name, path in photo_variants(tmp_path).items():
        expected = torchvision_tensor(weights_name, path)
        for ours in (evaluated_tensor(preprocessing, path), served_tensor(preprocessing, path)):
            difference = (ours - expected).abs()
            assert ours.shape == expected.shape == (3, 224, 224)
            if name == "whole":
                assert difference.mean() < 0.05, (name, float(difference.mean()))
            else:
                assert difference.mean() < 0.01, (name, float(difference.mean()))
                assert difference.quantile(0.99) <= 1.01 * one_grey_level, name


def test_todays_preprocessing_is_not_resnet152_v2s(tmp_path: Path) -> None:
    """What the previous test guards against: ResNet-152 V2's input made the 256/224 way
    differs from torchvision's 232/224 by far more than that test allows."""
    path = photo_variants(tmp_path)["wide"]
    expected = torchvision_tensor("ResNet152_Weights.IMAGENET1K_V2", path)
    todays = served_tensor(default_preprocessing(224), path)
    assert (todays - expected).abs().mean() > 0.3

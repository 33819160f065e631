"""`--weights`, resolved at the edge: a verified local file (or nothing) before any model is built.

`resolve_weights(value, arch, cache_dir=..., s3=...)` accepts
- `none`: random initialisation;
- `imagenet`: torchvision's pinned ImageNet weights for `arch`, as the file torchvision keeps in
  `$TORCH_HOME/hub/checkpoints` (downloaded there when missing, hash-checked either way; when it
  cannot be had, the error says how to stage it);
- a local `.pth`/`.pt`/`.safetensors` file (a staged copy of a torchvision file is hash-checked
  against its name);
- `s3://bucket/key`: downloaded into `<cache_dir>/weights/<bucket>/<key>`, again only when its
  etag changed (a temporary directory when there is no cache).

It returns `ResolvedWeights`: the file and a description of the source for cards and errors.
`models.build_model` loads it; nothing is unpickled as code (torch files load weights-only).

`preprocessing_for(weights_name, image_size)` is the preprocessing torchvision measured those
weights with (their `weights.transforms()`: resize, crop, mean, std, filter), read from the
enum without loading any weights; `weights_preprocessing(resolved, image_size)` is it for what
`--weights` resolved to (ImageNet, or a staged copy of a torchvision file, known by its name),
and today's values (`default_preprocessing`) for `none` or weights of unknown origin.

`check_weights_value(value, arch)` is the same judgement made up front, before anything starts
(`flowerml retrain`): the form, and a local file loaded and fitted to `arch`'s backbone on a
parameter-less model (meta device), which costs no model build.
"""

from __future__ import annotations

import http.client
import pickle
import re
import stat
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
import torchvision

from flowerml.core.files import sha256_file, write_atomically
from flowerml.data.preprocessing import INTERPOLATIONS, Preprocessing, default_preprocessing
from flowerml.models.backbones import (
    ARCHS,
    FlowerModel,
    ModelError,
    check_arch,
    load_backbone_state,
    split_torchvision_model,
    torchvision_model,
)

if TYPE_CHECKING:
    from flowerml.io.storage import S3Options, Store

# Pinned rather than `.DEFAULT`, so that a torchvision upgrade cannot change what "imagenet"
# means for a run without anyone noticing. These are each arch's best ImageNet-1k weights.
IMAGENET_WEIGHTS: dict[str, str] = {
    "resnet18": "IMAGENET1K_V1",
    "resnet34": "IMAGENET1K_V1",
    "resnet50": "IMAGENET1K_V2",
    "resnet101": "IMAGENET1K_V2",
    "resnet152": "IMAGENET1K_V2",
    "alexnet": "IMAGENET1K_V1",
    "vgg16": "IMAGENET1K_V1",
    "vgg19": "IMAGENET1K_V1",
    "mobilenet_v3_large": "IMAGENET1K_V2",
    "mobilenet_v3_small": "IMAGENET1K_V1",
    "efficientnet_b0": "IMAGENET1K_V1",
}
TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
FORMS = "none, imagenet, a file path, file://PATH or s3://bucket/key"
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# What a failed download can raise: network and TLS errors are OSErrors, a bad hash is a
# RuntimeError.
DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, RuntimeError, EOFError,
                   pickle.UnpicklingError, ValueError)


class WeightsError(ModelError):
    """A --weights value that cannot be used: unknown form, missing, damaged or not weights."""


class WeightsUnavailable(WeightsError):
    """ImageNet weights cannot be downloaded here; the message says how to stage them."""


@dataclass(frozen=True)
class ResolvedWeights:
    """What `--weights` resolved to: `file` (verified, local) or None for random init, and
    `source`, how cards and errors name it ("none", "imagenet:ResNet18_Weights.IMAGENET1K_V1",
    the path or the s3:// URI as given)."""

    source: str = "none"
    file: Path | None = None

    def state_dict(self) -> Mapping[str, Any] | None:
        """The file's state dict (None for random init); torch files load weights-only."""
        if self.file is None:
            return None
        return load_weights_file(self.file, label=self.source)


NO_WEIGHTS = ResolvedWeights()


def resolve_weights(value: str, arch: str, *, cache_dir: Path | None = None,
                    s3: S3Options | None = None) -> ResolvedWeights:
    """`--weights` as a verified local file; see the module docstring for the accepted forms.

    `cache_dir` is the flowerml cache root: S3 weights are kept under its `weights/`.
    """
    check_arch(arch)
    value = _check_form(value)
    if value.lower() == "none":
        return NO_WEIGHTS
    if value.lower() == "imagenet":
        return ResolvedWeights(f"imagenet:{imagenet_weights_name(arch)}",
                               imagenet_file(arch))
    if value.startswith("s3://"):
        return ResolvedWeights(value, _fetch_from_s3(value, cache_dir, s3))
    return ResolvedWeights(value, check_weights_file(local_path(value), label=value))


def check_weights_value(value: str, arch: str) -> None:
    """`--weights` judged before anything starts, as far as it can be without downloading:
    its form (a known scheme; s3:// naming a bucket and a key), and a local file that exists,
    is a regular file, loads as a state dict (weights-only) and fits `arch`'s backbone key for
    key and shape, checked on a parameter-less model (meta device) in well under a second.
    `imagenet` and s3:// files are fetched, and checked the same way, by the training child."""
    check_arch(arch)
    value = _check_form(value)
    if value.lower() in ("none", "imagenet"):
        return
    if value.startswith("s3://"):
        from flowerml.io.locations import parse_store

        location = parse_store(value, "--weights")  # the bucket's name checked too
        key = location.prefix  # type: ignore[union-attr]
        if not key or value.endswith("/"):
            raise WeightsError(f"--weights {value}: an S3 source needs s3://bucket/key to a file")
        _check_suffix(Path(key), value)
        return
    path = check_weights_file(local_path(value), label=value)
    check_weights_fit(load_weights_file(path, label=value), arch, value)


def check_weights_fit(state: Mapping[str, Any], arch: str, label: str) -> None:
    """`load_backbone_state`'s checks (every backbone key present, none extra, each shape
    right) against a model whose tensors have no storage: a ModelError naming the first
    mismatch, before any real model is built."""
    with torch.device("meta"):
        backbone, feature_dim = split_torchvision_model(arch, torchvision_model(arch))
        model = FlowerModel(arch, backbone, feature_dim, num_classes=1)
    with warnings.catch_warnings():  # copying into storage-less tensors is the no-op we want
        warnings.simplefilter("ignore", UserWarning)
        load_backbone_state(model, state, label)


def _check_form(value: object) -> str:
    """The value stripped, when it has a form `--weights` takes; a URL of another scheme is
    refused naming the ones that work (a path with "://" in it is no file anyone has)."""
    if not isinstance(value, str) or not value.strip():
        raise WeightsError(f"--weights must be {FORMS}")
    value = value.strip()
    scheme = URL_SCHEME.match(value)
    if scheme and scheme.group(1).lower() not in ("s3", "file"):
        raise WeightsError(f"--weights {value}: the scheme '{scheme.group(1)}' is not "
                           f"supported: give {FORMS}")
    return value


def local_path(value: str) -> Path:
    return Path(value.removeprefix("file://")).expanduser()


# --------------------------------------------------------------------------------------------
# ImageNet: torchvision's file, hash-checked


def imagenet_weights(arch: str) -> torchvision.models.WeightsEnum:
    return torchvision.models.get_model_weights(check_arch(arch))[IMAGENET_WEIGHTS[arch]]


def imagenet_weights_name(arch: str) -> str:
    weights = imagenet_weights(arch)
    return f"{type(weights).__name__}.{weights.name}"


def imagenet_file_name(arch: str) -> str:
    """The file name torchvision caches the arch's ImageNet weights under."""
    return Path(urlparse(imagenet_weights(arch).url).path).name


def hub_checkpoints_dir() -> Path:
    """Where torchvision looks for downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_file(arch: str) -> Path:
    """torchvision's ImageNet file for `arch` in the hub cache (downloaded when missing, its
    sha256 checked against its name either way), or WeightsUnavailable.

    Never falls back to random weights: a run that asked for ImageNet features and silently
    got noise would train for hours towards a useless model.
    """
    target = hub_checkpoints_dir() / imagenet_file_name(arch)
    if not target.is_file():
        expected = _torchvision_file_hashes().get(target.name)
        try:
            write_atomically(target, lambda temp: torch.hub.download_url_to_file(
                imagenet_weights(arch).url, str(temp), hash_prefix=expected, progress=False))
        except DOWNLOAD_ERRORS as error:
            raise WeightsUnavailable(_staging_message(arch, _one_line(error))) from None
    # torch.hub checks the hash only when it downloads; a copy staged by hand (or cut short
    # by a full disk) would otherwise load as whatever it happens to contain.
    if _hash_mismatch(target):
        raise WeightsUnavailable(_staging_message(arch, "sha256 does not match its file name"))
    return target


def _staging_message(arch: str, why: str) -> str:
    url = imagenet_weights(arch).url
    file = imagenet_file_name(arch)
    target = hub_checkpoints_dir() / file
    if target.exists():
        why += f"; the copy at {target} is damaged: delete it"
    return (f"ImageNet weights {imagenet_weights_name(arch)} ({url}) are unavailable: {why}. "
            f"To stage them, download {url} on a machine with internet and put it at "
            f"{target} (or set TORCH_HOME), or pass --weights /path/to/{file} or "
            f"--weights s3://bucket/{file}")


def _one_line(error: BaseException) -> str:
    text = str(getattr(error, "reason", None) or error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


@lru_cache(maxsize=1)
def _torchvision_file_hashes() -> dict[str, str]:
    """{file name: sha256 prefix} of every torchvision checkpoint for our archs."""
    hashes = {}
    for arch in ARCHS:
        for weights in torchvision.models.get_model_weights(arch):
            name = Path(urlparse(weights.url).path).name
            match = torch.hub.HASH_REGEX.search(name)
            if match:
                hashes[name] = match.group(1)
    return hashes


def _hash_mismatch(path: Path) -> str | None:
    """For a file named like one of torchvision's: its sha256 when that contradicts the name."""
    expected = _torchvision_file_hashes().get(path.name)
    if not expected:
        return None
    digest = sha256_file(path)
    return None if digest.startswith(expected) else digest


# --------------------------------------------------------------------------------------------
# The weights' own preprocessing


def preprocessing_for(weights_name: str | None, image_size: int) -> Preprocessing:
    """What torchvision's `weights_name` (e.g. "ResNet152_Weights.IMAGENET1K_V2") were
    measured with, `weights.transforms()`, for a model trained at `image_size`: their resize,
    crop, mean, std and filter (the resize scaled by image_size / crop when the two differ).
    None or "none": `default_preprocessing(image_size)`. No weights are loaded."""
    if weights_name is None or weights_name.lower() == "none":
        return default_preprocessing(image_size)
    try:
        preset = torchvision.models.get_weight(weights_name).transforms()
    except (KeyError, ValueError, AttributeError):
        raise WeightsError(f"{weights_name!r} names no torchvision weights") from None
    (crop,), (resize,) = preset.crop_size, preset.resize_size
    interpolation = preset.interpolation.value
    if interpolation not in INTERPOLATIONS:
        raise WeightsError(f"{weights_name} resize with {interpolation}: only "
                           f"{', '.join(INTERPOLATIONS)} are supported")
    return Preprocessing(resize=round(image_size * resize / crop), crop=image_size,
                         mean=tuple(preset.mean), std=tuple(preset.std),
                         interpolation=interpolation)


def weights_preprocessing(weights: ResolvedWeights, image_size: int) -> Preprocessing:
    """`preprocessing_for` the torchvision weights `weights` are (`imagenet`, or a file
    named like one of torchvision's: a staged copy, its hash checked against that name);
    today's values for random init or a file of unknown origin."""
    return preprocessing_for(torchvision_weights_name(weights), image_size)


def expected_preprocessing(value: str, arch: str, image_size: int) -> Preprocessing:
    """What a new run trained with `--weights value` will record, judged from the value alone
    (nothing fetched, no hash checked): `imagenet`'s weights, a file or S3 key named like a
    torchvision checkpoint, today's values otherwise. The training child decides for real
    (`weights_preprocessing`); this is for work done ahead, which a wrong guess only wastes."""
    value = _check_form(value)
    if value.lower() == "none":
        return default_preprocessing(image_size)
    if value.lower() == "imagenet":
        return preprocessing_for(imagenet_weights_name(arch), image_size)
    name = PurePosixPath(value.removeprefix("file://")).name
    return preprocessing_for(_torchvision_file_weights().get(name), image_size)


def torchvision_weights_name(weights: ResolvedWeights) -> str | None:
    """"ResNet152_Weights.IMAGENET1K_V2" for torchvision's weights, None for any other."""
    if weights.source.startswith("imagenet:"):
        return weights.source.removeprefix("imagenet:")
    if weights.file is None:
        return None
    return _torchvision_file_weights().get(weights.file.name)


@lru_cache(maxsize=1)
def _torchvision_file_weights() -> dict[str, str]:
    """{file name: weights name} of every torchvision checkpoint for our archs."""
    return {Path(urlparse(weights.url).path).name: f"{type(weights).__name__}.{weights.name}"
            for arch in ARCHS for weights in torchvision.models.get_model_weights(arch)}


# --------------------------------------------------------------------------------------------
# S3: a local copy, fetched again only when the object changed


def _fetch_from_s3(uri: str, cache_dir: Path | None, s3: S3Options | None) -> Path:
    from flowerml.io.storage import check_key
    from flowerml.io.storage_open import open_store

    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise WeightsError(f"--weights {uri}: an S3 source needs s3://bucket/key to a file")
    try:
        check_key(key)  # the key also names the local copy: no "..", no empty parts
    except ValueError as error:
        raise WeightsError(f"--weights {uri}: {error}") from None
    _check_suffix(Path(key), uri)
    store = open_store(f"s3://{bucket}", s3=s3, name="--weights")
    if cache_dir is None:
        return check_weights_file(_download_to_temp(store, key, uri), label=uri)
    return check_weights_file(_cached_object(store, key, Path(cache_dir) / "weights" / bucket),
                              label=uri)


_TEMP_DIRS: list[tempfile.TemporaryDirectory] = []


def _download_to_temp(store: Store, key: str, uri: str) -> Path:
    """Without a cache: a private temporary directory, removed when the process exits."""
    temp = tempfile.TemporaryDirectory(prefix="flowerml-weights-")
    _TEMP_DIRS.append(temp)  # kept alive until exit: the model is built from it later
    return _download(store, key, Path(temp.name) / Path(key).name, uri)


def _cached_object(store: Store, key: str, root: Path) -> Path:
    """The object's local copy under `root`, downloaded again only when its etag changed."""
    path = root / key
    etag_file = path.with_name(path.name + ".etag")
    info = store.head(key)
    if info is None:
        raise WeightsError(f"--weights {store.uri}/{key}: no such object")
    if path.is_file() and etag_file.is_file() and etag_file.read_text() == info.etag \
            and path.stat().st_size == info.size:
        return path
    _download(store, key, path, f"{store.uri}/{key}")
    write_atomically(etag_file, info.etag.encode())
    return path


def _download(store: Store, key: str, path: Path, label: str) -> Path:
    from flowerml.io.storage import ObjectNotFound

    try:
        return store.get_file(key, path)
    except ObjectNotFound:
        raise WeightsError(f"--weights {label}: no such object") from None


# --------------------------------------------------------------------------------------------
# Local files


def _check_suffix(path: Path, label: str) -> None:
    if path.suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise WeightsError(f"--weights {label}: expected a {', '.join(TORCH_SUFFIXES)} or "
                           f"{SAFETENSORS_SUFFIX} file")


def check_weights_file(path: Path, *, label: str | None = None) -> Path:
    """`path` when it is a weights file that exists and, named like one of torchvision's
    files, has the sha256 its name promises (the same check as torchvision's download)."""
    label = label or str(path)
    _check_suffix(path, label)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise WeightsError(f"--weights {label}: no such file {path}") from None
    except OSError as error:
        raise WeightsError(f"--weights {label}: cannot read {path}: "
                           f"{error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        raise WeightsError(f"--weights {label}: {path} is not a regular file "
                           f"({_file_kind(mode)})")
    digest = _hash_mismatch(path)
    if digest:
        raise WeightsError(f"--weights {label}: sha256 {digest[:12]}... does not match the hash "
                           f"in torchvision's file name {path.name} (truncated or wrong file?)")
    return path


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def load_weights_file(path: Path, *, label: str | None = None) -> Mapping[str, Any]:
    """The state dict in a .safetensors or .pth/.pt file; torch files load weights-only."""
    label = label or str(path)
    _check_suffix(path, label)
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():
                # A plain pickle warns about its protocol on stderr before being refused:
                # the refusal below is the one line the user needs.
                warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                        category=UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"--weights {label}: no such file {path}") from None
    except Exception as error:  # noqa: BLE001 - any failure to parse is a bad file
        raise WeightsError(f"--weights {label}: cannot be loaded as weights: "
                           f"{_describe_load_error(error)}") from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"--weights {label}: holds a {type(state).__name__}, not a state dict")
    return state


def _describe_load_error(error: Exception) -> str:
    """The reason without torch's advice to retry with weights_only=False (never do that)."""
    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return (f"it holds a pickled object ({refused.group(1)}) and only tensors are loaded; "
                "save model.state_dict() or a .safetensors file")
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail:
        return f"not a torch weights file ({detail.group(1).strip()})"
    return _one_line(error)


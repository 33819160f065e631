"""Synthetic archives must be readable exactly like the real Flowers-102 files."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from flowerml.core.errors import UserError
from flowerml.data.flower_drawing import draw_flower
from flowerml.data.flowers import ARCHIVE, LABELS, MEMBER_PATTERN, SETID, SPLIT_KEYS, image_name
from flowerml.data.synthetic import SyntheticSpec, build_split, write_synthetic_archive

SPEC = SyntheticSpec(classes=5, per_class=7, image_size=48, seed=3)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_archive(tmp_path_factory.mktemp("synthetic"), SPEC)


def read_members(path: Path) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(path, mode="r:gz") as tar:
        return {
            info.name: (info, tar.extractfile(info).read() if info.isfile() else None)
            for info in tar
        }


def load_labels(path: Path) -> np.ndarray:
    return scipy.io.loadmat(path)["labels"]


def load_split(path: Path) -> dict[str, np.ndarray]:
    mat = scipy.io.loadmat(path)
    return {key: mat[key] for key in SPLIT_KEYS.values()}


def expected_train_valid(n: int) -> int:
    return max(1, round(n * 0.25))


def test_writes_exactly_the_three_source_files(archive):
    assert set(archive) == {ARCHIVE, LABELS, SETID}
    out_dir = archive[ARCHIVE].parent
    for name, path in archive.items():
        assert path == out_dir / name
        assert path.is_file() and path.stat().st_size > 0
    # No temporary files left behind next to them.
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(archive)


def test_archive_holds_the_jpg_dir_and_consecutive_rgb_jpegs(archive):
    members = read_members(archive[ARCHIVE])
    n = SPEC.num_images
    expected = ["jpg"] + [f"jpg/{image_name(i)}" for i in range(1, n + 1)]
    assert list(members) == expected

    directory, _ = members["jpg"]
    assert directory.isdir()
    for name in expected[1:]:
        info, data = members[name]
        assert info.isreg() and info.mode == 0o644 and info.uid == info.gid == 0
        assert re.fullmatch(MEMBER_PATTERN, name)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert not image.info.get("progressive")  # baseline, like the real archive
            image.load()
            assert max(image.size) == SPEC.image_size
            assert 0.7 * SPEC.image_size - 1 <= min(image.size) <= SPEC.image_size


def test_images_vary_in_shape_like_real_photographs(tmp_path):
    paths = write_synthetic_archive(tmp_path, SyntheticSpec(classes=3, per_class=8, image_size=40))
    sizes = set()
    for _, (info, data) in read_members(paths[ARCHIVE]).items():
        if info.isfile():
            with Image.open(io.BytesIO(data)) as image:
                sizes.add(image.size)
    assert len(sizes) > 3
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)


def test_labels_are_1_based_balanced_and_not_sorted(archive):
    labels = load_labels(archive[LABELS])
    assert labels.shape == (1, SPEC.num_images)
    counts = Counter(labels.ravel().tolist())
    assert counts == {label: SPEC.per_class for label in range(1, SPEC.classes + 1)}
    # The real archive is not ordered by class; neither is ours.
    assert not np.all(np.diff(labels.ravel().astype(int)) >= 0)


def test_split_covers_every_image_once_with_the_per_class_sizes(archive):
    labels = load_labels(archive[LABELS]).ravel()
    split = load_split(archive[SETID])
    for ids in split.values():
        assert ids.shape[0] == 1 and ids.ndim == 2
        assert np.all(np.diff(ids.ravel().astype(int)) > 0)  # sorted, no repeats

    all_ids = np.concatenate([ids.ravel() for ids in split.values()]).astype(int)
    assert sorted(all_ids.tolist()) == list(range(1, SPEC.num_images + 1))

    share = expected_train_valid(SPEC.per_class)
    expected = {"trnid": share, "valid": share, "tstid": SPEC.per_class - 2 * share}
    for key, ids in split.items():
        per_class = Counter(labels[ids.ravel().astype(int) - 1].tolist())
        assert per_class == {label: expected[key] for label in range(1, SPEC.classes + 1)}


@pytest.mark.parametrize("sizes", [(3, 4, 5), (6, 10, 21), (3,)])
def test_build_split_sizes_for_uneven_classes(sizes):
    labels = np.concatenate([np.full(n, label + 1) for label, n in enumerate(sizes)])
    labels = np.random.default_rng(0).permutation(labels)
    split = build_split(labels, np.random.default_rng(1))

    assert set(split) == {"trnid", "valid", "tstid"}
    union = np.concatenate(list(split.values()))
    assert sorted(union.tolist()) == list(range(1, len(labels) + 1))
    for label, n in enumerate(sizes, start=1):
        counts = {key: int(np.sum(labels[ids - 1] == label)) for key, ids in split.items()}
        share = expected_train_valid(n)
        assert counts == {"trnid": share, "valid": share, "tstid": n - 2 * share}
        assert counts["tstid"] >= 1


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    spec = SyntheticSpec(classes=4, per_class=5, image_size=32, seed=11)
    first = write_synthetic_archive(tmp_path / "a", spec)
    again = write_synthetic_archive(tmp_path / "b", spec)
    other = write_synthetic_archive(tmp_path / "c", replace(spec, seed=12))
    for name in (ARCHIVE, LABELS, SETID):
        assert first[name].read_bytes() == again[name].read_bytes(), name
        assert first[name].read_bytes() != other[name].read_bytes(), name


@pytest.mark.parametrize(
    ("fields", "option"),
    [
        ({"classes": 0}, "--classes"),
        ({"classes": 103}, "--classes"),
        ({"per_class": 2}, "--per-class"),
        ({"classes": 102, "per_class": 1000}, "--per-class"),
        ({"image_size": 31}, "--image-size"),
        ({"image_size": 4097}, "--image-size"),
        ({"classes": 1, "per_class": 100_000}, "--per-class"),
        ({"seed": -1}, "--seed"),
        ({"jpeg_quality": 0}, "--jpeg-quality"),
        ({"jpeg_quality": 96}, "--jpeg-quality"),
        ({"classes": "10"}, "--classes"),
    ],
)
def test_invalid_spec_is_a_user_error_naming_the_field(fields, option):
    with pytest.raises(UserError, match=re.escape(option)):
        SyntheticSpec(**fields)


def test_out_dir_that_is_a_file_is_a_user_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        write_synthetic_archive(not_a_dir, SyntheticSpec(classes=1, per_class=3, image_size=32))


def test_images_of_one_class_all_differ(archive):
    labels = load_labels(archive[LABELS]).ravel()
    members = read_members(archive[ARCHIVE])
    digests = {
        hashlib.sha256(members[f"jpg/{image_name(i + 1)}"][1]).hexdigest()
        for i in np.flatnonzero(labels == 1)
    }
    assert len(digests) == SPEC.per_class

    a = np.asarray(draw_flower(1, np.random.default_rng(1), 64, 64), dtype=int)
    b = np.asarray(draw_flower(1, np.random.default_rng(2), 64, 64), dtype=int)
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).mean() > 5


def colour_signature(label: int, samples: int = 6) -> np.ndarray:
    """Mean RGB of the strongly coloured pixels (the flowers, not the muted background)."""
    pixels = []
    for k in range(samples):
        image = draw_flower(label, np.random.default_rng(k), 64, 56)
        hsv = np.asarray(image.convert("HSV"), dtype=float)
        rgb = np.asarray(image, dtype=float)
        pixels.append(rgb[hsv[..., 1] > 160])
    return np.concatenate(pixels).mean(axis=0)


def test_classes_have_distinct_colour_signatures():
    first, second, again = colour_signature(1), colour_signature(2), colour_signature(1)
    assert np.linalg.norm(first - second) > 40
    assert np.linalg.norm(first - again) < 1e-9  # deterministic for the same seeds


def test_draw_flower_returns_the_requested_size():
    image = draw_flower(102, np.random.default_rng(0), 500, 375)
    assert image.mode == "RGB" and image.size == (500, 375)


def test_labels_file_says_it_is_synthetic_and_still_reads_as_the_official_format(archive,
                                                                                 tmp_path):
    from flowerml.data.splits import read_official_split
    from flowerml.data.synthetic import SYNTHETIC_MARKER, is_synthetic
    from tests.helpers.archives import rewrite_mat

    assert is_synthetic(archive[LABELS])
    marker = scipy.io.loadmat(archive[LABELS])[SYNTHETIC_MARKER]
    assert "seed=3" in str(marker[0]) and "not photographs" in str(marker[0])
    split = read_official_split(archive[LABELS], archive[SETID])  # the official reader
    assert split.num_images == SPEC.num_images
    real_format = tmp_path / LABELS
    real_format.write_bytes(archive[LABELS].read_bytes())
    rewrite_mat(real_format, **{SYNTHETIC_MARKER: None})  # the official file's variables only
    assert not is_synthetic(real_format)


SMALL = SyntheticSpec(classes=2, per_class=3, image_size=32)


def test_existing_archive_is_not_overwritten_without_force(tmp_path):
    first = write_synthetic_archive(tmp_path, SMALL)
    before = {name: (path.read_bytes(), path.stat().st_mtime_ns) for name, path in first.items()}
    with pytest.raises(UserError) as caught:
        write_synthetic_archive(tmp_path, replace(SMALL, seed=9))
    assert str(caught.value) == f"{tmp_path / ARCHIVE} already exists (--force overwrites it)"
    assert {name: (path.read_bytes(), path.stat().st_mtime_ns)
            for name, path in first.items()} == before
    forced = write_synthetic_archive(tmp_path, replace(SMALL, seed=9), force=True)
    assert forced[LABELS].read_bytes() != before[LABELS][0]


def test_any_one_of_the_three_files_is_refused(tmp_path):
    (tmp_path / SETID).write_bytes(b"someone's file")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / SETID} already exists")):
        write_synthetic_archive(tmp_path, SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SETID]  # nothing else written


def test_out_dir_that_cannot_be_created_is_a_user_error():
    with pytest.raises(UserError, match="^cannot create output directory /proc/flowerml-x/y: "):
        write_synthetic_archive(Path("/proc/flowerml-x/y"), SMALL)


def test_synth_cli_refuses_overwrite_and_uncreatable_dirs(tmp_path):
    from tests.helpers.cli import assert_refused, invoke

    args = ("--classes", "2", "--per-class", "3", "--image-size", "32")
    assert invoke("synth", str(tmp_path), *args).exit_code == 0
    labels = (tmp_path / LABELS).read_bytes()
    assert_refused(invoke("synth", str(tmp_path), *args, "--seed", "4"),
                   f"{tmp_path / ARCHIVE} already exists (--force overwrites it)")
    assert (tmp_path / LABELS).read_bytes() == labels
    forced = invoke("synth", str(tmp_path), *args, "--seed", "4", "--force")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / LABELS).read_bytes() != labels
    assert_refused(invoke("synth", "/proc/foo"), "cannot create output directory /proc/foo")


@pytest.mark.parametrize(("args", "line"), [
    (["--image-size", "100000"], "--image-size must be between 32 and 4096 (got 100000)"),
    (["--per-class", "10000000000"], "--per-class must be between 3 and 99999 (got 10000000000)"),
    (["--classes", "1000"], "--classes must be between 1 and 102 (got 1000)"),
])
def test_a_size_out_of_bounds_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str],
                                                             line: str) -> None:
    from tests.helpers.cli import invoke

    result = invoke("synth", str(tmp_path / "out"), *args)
    assert (result.exit_code, result.stderr, result.stdout) == (2, f"flowerml: error: {line}\n",
                                                                "")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_help_states_the_bounds_the_spec_enforces() -> None:
    from flowerml.cli import data
    from flowerml.data import synthetic

    assert (data.MAX_IMAGES, data.MAX_IMAGE_SIZE) == (synthetic.MAX_IMAGES,
                                                      synthetic.MAX_IMAGE_SIZE)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_stopped_synth_leaves_no_temp_file(tmp_path: Path, signum: str) -> None:
    """The real console script, stopped while it writes the archive's temp file."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    # As a terminal starts a foreground command: SIGINT at its default. A suite run as a
    # background job (`make test &`) has it ignored, and would hand that on to the command.
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("flowerml")), "synth", str(out), "--classes", "10",
         "--per-class", "50", "--image-size", "1024"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob(".tmp-*")):
            assert process.poll() is None and time.monotonic() < deadline, "no temp file seen"
            time.sleep(0.05)
        process.send_signal(getattr(signal, signum))
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + getattr(signal, signum), stderr
    assert stderr == f"flowerml: error: stopped by {signum}\n"
    assert list(out.iterdir()) == []  # no temp file, no archive


def test_labelled_folders_are_class_folders_of_new_images_fixed_by_their_seed(
        tmp_path: Path) -> None:
    from PIL import Image

    from flowerml.data.synthetic import write_labelled_folders

    assert write_labelled_folders(tmp_path / "a", classes=2, per_class=2, image_size=48,
                                  seed=3) == 4
    write_labelled_folders(tmp_path / "b", classes=2, per_class=2, image_size=48, seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert [str(p) for p in files] == ["001/new_0.jpg", "001/new_1.jpg", "002/new_0.jpg",
                                       "002/new_1.jpg"]
    data = [(tmp_path / "a" / p).read_bytes() for p in files]
    assert len(set(data)) == 4 and data == [(tmp_path / "b" / p).read_bytes() for p in files]
    with Image.open(tmp_path / "a" / files[0]) as image:
        assert image.format == "JPEG" and max(image.size) == 48

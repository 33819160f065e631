"""One pass over the Flowers-102 archive: each image staged on disk, with its size, sha256 and
decode verdict, cached per archive MD5.

`load_or_survey` returns the survey of an exact archive, from `cache/<name>/survey/<md5>/` or
by decompressing it once (`survey.json` written last: it vouches for every staged image), so
an ingest's fetch and publish steps, and a re-run, never decompress it twice. Publishing
uploads the staged images, byte-identical to the archive's; an image that does not decode as
a JPEG (`check_jpeg`) is quarantined rather than published.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from flowerml.core.errors import ArchiveError
from flowerml.core.files import write_atomically
from flowerml.core.progress import Progress
from flowerml.data import flowers
from flowerml.data.archive import ArchiveImage, iter_archive_images
from flowerml.data.splits import OfficialSplit
from flowerml.io.storage import run_bounded


def check_jpeg(data: bytes) -> str | None:
    """None when `data` is a JPEG that decodes; otherwise why not."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return f"not a JPEG ({image.format})"
            width, height = image.size
            if width * height > (Image.MAX_IMAGE_PIXELS or width * height):
                return f"decompression bomb ({width}x{height} pixels)"
            # Decoding at 1/8 scale still reads every entropy-coded byte, so truncation and
            # corrupt data fail the same way, at a fraction of the cost.
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"does not decode: {error}"
    return None


@dataclass
class Survey:
    """What one pass over the archive learned: each image's size, sha256 and decode verdict.

    The images themselves are staged beside it, so publishing needs no second pass over the
    compressed archive.
    """

    folder: Path
    sizes: dict[int, int]
    sha256: dict[int, str]
    problems: dict[int, str]
    present: set[int]

    def staged(self, image_id: int) -> Path:
        return self.folder / flowers.image_name(image_id)

    def to_json(self) -> dict:
        return {"sizes": self.sizes, "sha256": self.sha256, "problems": self.problems,
                "present": sorted(self.present)}

    @classmethod
    def from_json(cls, folder: Path, value: dict) -> Survey:
        def by_id(mapping: dict) -> dict:
            return {int(k): v for k, v in mapping.items()}

        return cls(folder, by_id(value["sizes"]), by_id(value["sha256"]),
                   by_id(value["problems"]), set(value["present"]))


def survey_folder(cache_dir: Path, dataset: str, archive_md5: str) -> Path:
    return cache_dir / dataset / "survey" / archive_md5


def load_or_survey(archive: Path, archive_md5: str, cache_dir: Path, dataset: str,
                   workers: int | None, progress: Progress) -> Survey:
    """The survey of this exact archive: from the cache, or by one pass over it."""
    folder = survey_folder(cache_dir, dataset, archive_md5)
    record = folder / "survey.json"
    if record.is_file():
        return Survey.from_json(folder, json.loads(record.read_text()))
    survey = survey_archive(archive, folder, workers or default_workers(), progress)
    # Written last: it vouches for every staged image.
    write_atomically(record, json.dumps(survey.to_json()).encode())
    return survey


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


def survey_archive(archive: Path, folder: Path, workers: int, progress: Progress) -> Survey:
    """Stage, sha256 and decode-check every image on `workers` threads (Pillow drops the GIL)."""
    folder.mkdir(parents=True, exist_ok=True)
    survey = Survey(folder, {}, {}, {}, set())

    def inspect(image: ArchiveImage) -> int:
        survey.staged(image.image_id).write_bytes(image.data)
        survey.sizes[image.image_id] = len(image.data)
        survey.sha256[image.image_id] = hashlib.sha256(image.data).hexdigest()
        problem = check_jpeg(image.data)
        if problem:
            survey.problems[image.image_id] = problem
        return len(image.data)

    def images() -> Iterator[ArchiveImage]:
        for image in iter_archive_images(archive):
            survey.present.add(image.image_id)
            yield image

    progress.start("checking images", None)
    run_bounded(inspect, images(), workers, lambda _size: progress.advance())
    return survey


def check_members_cover_split(archive_name: str, present: set[int], split: OfficialSplit) -> None:
    """Every image setid.mat names is in the archive."""
    missing = sorted(set(split.split_of()) - present)
    if missing:
        names = ", ".join(flowers.image_name(i) for i in missing[:5])
        raise ArchiveError(f"{archive_name}: {len(missing)} image(s) named in setid.mat are "
                           f"missing from the archive ({names})")

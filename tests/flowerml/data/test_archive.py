"""Safe streaming of the archive: only jpg/image_NNNNN.jpg regular files ever come out."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from flowerml.core.errors import ArchiveError, SourceError
from flowerml.data.archive import iter_archive_images, sniff_archive, sniff_mat
from tests.helpers.archives import regular, special, write_tgz


def test_yields_images_in_order_with_exact_bytes(tmp_path: Path) -> None:
    jpg_dir = tarfile.TarInfo("jpg")
    jpg_dir.type = tarfile.DIRTYPE
    path = write_tgz(tmp_path / "a.tgz", [(jpg_dir, None), regular("jpg/image_00002.jpg", b"two"),
                                           regular("jpg/image_00001.jpg", b"one")])
    images = list(iter_archive_images(path))
    assert [(i.image_id, i.member, i.data) for i in images] == [
        (2, "jpg/image_00002.jpg", b"two"), (1, "jpg/image_00001.jpg", b"one")]


@pytest.mark.parametrize(("member", "message"), [
    (regular("../evil.jpg"), "unsafe path"),
    (regular("jpg/../../evil.jpg"), "unsafe path"),
    (regular("/etc/evil.jpg"), "unsafe path"),
    (special("jpg/image_00002.jpg", tarfile.SYMTYPE, "/etc/passwd"), "links are refused"),
    (special("jpg/image_00002.jpg", tarfile.LNKTYPE, "jpg/image_00001.jpg"), "links are refused"),
    (special("jpg/image_00002.jpg", tarfile.CHRTYPE), "special files"),
    (special("jpg/image_00002.jpg", tarfile.FIFOTYPE), "special files"),
    (regular("jpg/readme.txt"), "not of the form"),
    (special("other", tarfile.DIRTYPE), "unexpected directory"),
])
def test_refuses_unsafe_members(tmp_path: Path, member, message: str) -> None:
    path = write_tgz(tmp_path / "bad.tgz", [regular("jpg/image_00001.jpg"), member])
    with pytest.raises(ArchiveError, match=message) as caught:
        list(iter_archive_images(path))
    assert repr(member[0].name) in str(caught.value)
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()


def test_refuses_oversized_member_and_total(tmp_path: Path) -> None:
    path = write_tgz(tmp_path / "big.tgz", [regular("jpg/image_00001.jpg", b"x" * 100),
                                             regular("jpg/image_00002.jpg", b"x" * 100)])
    with pytest.raises(ArchiveError, match="exceeds the 50-byte cap"):
        list(iter_archive_images(path, max_member_bytes=50))
    with pytest.raises(ArchiveError, match="more than 150 bytes"):
        list(iter_archive_images(path, max_total_bytes=150))


def test_refuses_duplicate_member(tmp_path: Path) -> None:
    path = write_tgz(tmp_path / "dup.tgz", [regular("jpg/image_00001.jpg"),
                                             regular("jpg/image_00001.jpg")])
    with pytest.raises(ArchiveError, match="appears twice"):
        list(iter_archive_images(path))


def test_truncated_gzip_is_caught(synthetic_source: Path, tmp_path: Path) -> None:
    data = (synthetic_source / "102flowers.tgz").read_bytes()
    for cut in (len(data) // 2, len(data) - 8):
        path = tmp_path / "cut.tgz"
        path.write_bytes(data[:cut])
        with pytest.raises(ArchiveError, match="cut.tgz: truncated or corrupt"):
            list(iter_archive_images(path))


def test_html_page_instead_of_archive(tmp_path: Path) -> None:
    page = tmp_path / "102flowers.tgz"
    page.write_bytes(b"\n<!DOCTYPE html><html><body>Service unavailable</body></html>")
    with pytest.raises(ArchiveError, match="HTML page, not a gzip archive"):
        sniff_archive(page)
    page.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ArchiveError, match="not a gzip archive"):
        sniff_archive(page)


def test_html_page_instead_of_mat(tmp_path: Path) -> None:
    page = tmp_path / "setid.mat"
    page.write_bytes(b"<html><body>404</body></html>")
    with pytest.raises(SourceError, match="setid.mat: is an HTML page"):
        sniff_mat(page)

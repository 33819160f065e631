"""flowerml.core.files: atomic writes honour the umask, like open(), and leave no temp files; a file
a user names is read only when it is a regular file, and only up to its cap."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerml.core.files import (
    FileRefused,
    make_folder,
    md5_file,
    open_user_file,
    read_user_file,
    sha256_file,
    temp_beside,
    write_atomically,
)
from flowerml.io.storage_local import LocalStore


@pytest.fixture(params=[0o022, 0o027])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under this umask, restored afterwards."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_honour_the_umask_like_open(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask  # 0644 under 022, 0640 under 027
    (tmp_path / "plain").write_bytes(b"x")
    assert mode(tmp_path / "plain") == expected
    assert mode(write_atomically(tmp_path / "a.json", b"{}")) == expected
    assert mode(write_atomically(tmp_path / "b.bin", lambda t: t.write_bytes(b"b"))) == expected
    with temp_beside(tmp_path / "c.pt") as temp:
        assert temp.name.startswith(".tmp-") and temp.suffix == ".pt"
        assert mode(temp) == expected and temp.read_bytes() == b""
    assert not temp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "plain"]


def test_local_store_files_honour_the_umask(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask
    store = LocalStore(tmp_path / "store")
    source = tmp_path / "source.bin"
    source.write_bytes(b"s")
    source.chmod(0o600)  # the copy takes the store's mode, not the source's
    store.put_bytes("a/plain", b"1")
    store.put_bytes("a/created", b"2", if_none_match=True)
    _, etag = store.get_with_etag("a/plain")
    store.put_bytes("a/plain", b"3", if_match=etag)
    store.put_file("a/file", source)
    for key in ("a/plain", "a/created", "a/file"):
        assert mode(tmp_path / "store" / key) == expected, key
    assert mode(store.get_file("a/file", tmp_path / "out" / "file")) == expected


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = write_atomically(tmp_path / "t.txt", b"old")

    def fail(temp: Path) -> None:
        temp.write_bytes(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_atomically(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_a_folder_tidied_away_before_the_temp_file_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread's removal of empty folders (LocalStore's write probe) may rmdir the folder
    between temp_beside's mkdir and its open: the write still lands."""
    folder = tmp_path / "_probe"
    real_open = os.open
    removed = []

    def open_after_a_tidy_up(path, *args, **kwargs):
        if not removed:
            Path(path).parent.rmdir()  # what the other thread's tidy-up does
            removed.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("flowerml.core.files.os.open", open_after_a_tidy_up)
    target = write_atomically(folder / "probe", b"written")
    assert removed and target.read_bytes() == b"written"
    assert [p.name for p in folder.iterdir()] == ["probe"]


def test_a_folder_removed_as_mkdir_finds_it_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mkdir finds the folder (EEXIST), then another thread's tidy-up removes it before the
    check that it is a folder: it is made again instead of the write failing."""
    folder = tmp_path / "_probe"
    folder.mkdir()
    real_mkdir = os.mkdir
    tidied = []

    def mkdir_then_tidy_up(path, *args, **kwargs):
        if not tidied and Path(path) == folder:
            tidied.append(path)
            try:
                real_mkdir(path, *args, **kwargs)
            finally:
                folder.rmdir()  # what the other thread's tidy-up does
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr("pathlib.os.mkdir", mkdir_then_tidy_up)
    make_folder(folder)
    assert tidied and folder.is_dir()


def test_make_folder_holds_while_others_remove_and_remake_it(tmp_path: Path) -> None:
    """Threads that rmdir and mkdir the folder all the time (the write probes' tidy-up and
    their writes) never make make_folder fail: a check that saw the folder gone, then a second
    that saw it back, once raised 'File exists' in the suite. Thread switches are forced every
    microsecond so that the interleavings happen within the test's second or two."""
    import sys
    import threading

    folder = tmp_path / "_probe"
    stop, errors = threading.Event(), []

    def churn() -> None:
        while not stop.is_set():
            for change in (folder.rmdir, folder.mkdir):
                with contextlib.suppress(OSError):
                    change()

    def make() -> None:
        try:
            for _ in range(100_000):
                make_folder(folder)
        except OSError as error:
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        churners = [threading.Thread(target=churn) for _ in range(2)]
        makers = [threading.Thread(target=make) for _ in range(2)]
        for thread in churners + makers:
            thread.start()
        for thread in makers:
            thread.join()
        stop.set()
        for thread in churners:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def test_a_file_where_the_folder_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"a file")
    with pytest.raises(FileExistsError):
        make_folder(tmp_path / "taken")
    assert (tmp_path / "taken").read_bytes() == b"a file"


def test_racing_write_probes_of_a_local_store_all_pass(tmp_path: Path) -> None:
    """Each probe removes the `_probe/` folder once it is empty: three threads probing at once
    removed it under each other (a failure seen in the suite)."""
    import threading

    store = LocalStore(tmp_path / "store")
    store.check()
    barrier, errors = threading.Barrier(3), []

    def probe() -> None:
        barrier.wait()
        try:
            for _ in range(50):
                store.check_writable()
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=probe) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert not (tmp_path / "store" / "_probe").exists()


@pytest.mark.timeout(30)  # a FIFO that is opened or read blocks: fail, do not hang the suite
def test_a_user_file_is_a_regular_file_or_one_clear_refusal(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "keys.txt").write_text("a.jpg\n")
    expected = {
        "pipe.jpg": ("is a FIFO (named pipe), not a regular file", "bad-input"),
        "zero.jpg": ("is a character device, not a regular file", "bad-input"),
        "loop": ("symbolic link loop", "bad-input"),
        "missing": ("no such file", "not-found"),
        ".": ("is a folder, not a file", "bad-input"),
    }
    for name, (reason, kind) in expected.items():
        with pytest.raises(FileRefused) as refused:
            read_user_file(tmp_path / name, limit=1024)
        assert (refused.value.reason, refused.value.kind) == (reason, kind), name
        assert str(refused.value) == f"{tmp_path / name}: {reason}"
    with pytest.raises(FileRefused, match="^/proc/self/mem: cannot read: Input/output error$"):
        read_user_file("/proc/self/mem", limit=1024)
    assert read_user_file(tmp_path / "keys.txt", limit=6) == b"a.jpg\n"


def test_a_user_file_is_read_no_further_than_its_cap(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 100)
    with pytest.raises(FileRefused) as refused:
        read_user_file(big, limit=99, what="a list file")
    assert refused.value.reason == "larger than 99 bytes, the limit for a list file"
    # A file whose size says 0 (procfs) but that reads on is stopped at the cap while read.
    with pytest.raises(FileRefused, match="larger than 16 bytes, the limit for a file$"):
        read_user_file("/proc/self/status", limit=16)
    with open_user_file(big, limit=100) as handle:  # exactly the cap is fine
        assert handle.read(10) == b"x" * 10 and len(handle.read()) == 90


def test_file_checksums_are_read_in_chunks(tmp_path: Path):
    blob = bytes(range(256)) * 12_000  # ~3 MiB: more than one read
    path = tmp_path / "blob"
    path.write_bytes(blob)
    assert md5_file(path) == hashlib.md5(blob).hexdigest()
    assert sha256_file(path) == hashlib.sha256(blob).hexdigest()

"""mmshim.layer against real overlay and tmpfs mounts, and against hand-built hostile archives.

Needs root (mount, chown, mknod). Test data stays small: the one big file is sparse.
"""

import errno
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mmshim import layer, libc
from mmshim.layer import LayerError, TooLarge
from tests.conftest import open_fds
from tests.disks import xfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, chown, mknod")

MiB = 1 << 20
SPARSE_SIZE = 32 * MiB
BADNAME = b"bin\xff\xfe.dat"  # not UTF-8
LONGNAME = "n" * 120 + ".txt"
ALIGN = 64 << 10  # a small chunk size: many files reach it
LONGTARGET = "/" + "t" * 150


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount, last first, whatever the test's outcome."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        _umount(point)


def _write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)


def _overlay(tmp: Path, mounts: list[Path], extra: str = "", suffix: str = "") -> tuple[Path, Path, Path]:
    lower = tmp / "lower"
    upper, work, merged = (tmp / (n + suffix) for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}" + extra
    _mount("-t", "overlay", "overlay", "-o", opts, str(merged))
    mounts.append(merged)
    return lower, upper, merged


def _populate_lower(lower: Path) -> None:
    _write(lower / "a.txt", "lower a\n")
    _write(lower / "keep.txt", "keep\n")
    _write(lower / "chm.txt", "chmod me\n", 0o644)
    _write(lower / "d/x", "x\n")
    _write(lower / "d/y", "y\n")
    _write(lower / "gone/z", "z\n")
    _write(lower / "gone/sub/w", "w\n")
    _write(lower / "olddir/o1", "o1\n")
    _write(lower / "olddir/o2", "o2\n")
    _write(lower / "df/q", "q\n")
    _write(lower / "bin/tool", "#!/bin/sh\n", 0o755)
    _write(lower / "xa.txt", "xattrs\n")
    os.setxattr(lower / "xa.txt", "user.lower", b"from-image")
    _write(lower / "deep/a/b/c/file", "deep\n")
    (lower / "lowlink").symlink_to("keep.txt")
    (lower / "lowlink2").symlink_to("keep.txt")
    (lower / "ld").symlink_to("d")


def _change_merged(m: Path) -> None:
    """Every kind of change a container makes, done through the overlay as the container would."""
    _write(m / "new.txt", "brand new\n")
    with open(m / "a.txt", "a") as f:
        f.write("appended\n")
    os.chown(m / "chm.txt", 1234, 5678)
    os.chmod(m / "chm.txt", 0o600)
    os.chmod(m / "bin/tool", 0o4755)
    (m / "d/x").unlink()  # whiteout
    subprocess.run(["rm", "-rf", str(m / "gone")], check=True)  # whiteout of a directory
    subprocess.run(["rm", "-rf", str(m / "olddir")], check=True)
    (m / "olddir").mkdir()  # opaque
    _write(m / "olddir/n", "new in opaque\n")
    (m / "ld").unlink()  # lower symlink replaced by a directory
    _write(m / "ld/f", "was a symlink\n")
    subprocess.run(["rm", "-rf", str(m / "df")], check=True)  # lower directory replaced by a file
    _write(m / "df", "was a dir\n")
    (m / "lowlink2").unlink()
    _write(m / "lowlink2", "was a symlink\n")
    (m / "s").symlink_to("/etc/hostname")
    (m / "r").symlink_to("a.txt")
    (m / "longlink").symlink_to(LONGTARGET)
    _write(m / "h1", "hard\n")
    (m / "sub").mkdir()
    os.link(m / "h1", m / "sub/h2")
    os.link(m / "keep.txt", m / "keep-link")  # a hard link to an image file: copied up, then linked
    with open(m / "sparse.bin", "wb") as f:
        f.write(b"head")
        f.seek(16 * MiB)
        f.write(b"middle")
        f.truncate(SPARSE_SIZE)  # ends in a hole
    os.setxattr(m / "new.txt", "user.test", b"v\x00\xff")
    os.setxattr(m / "xa.txt", "user.test", b"on a copied-up file")
    os.setxattr(m / "new.txt", "security.mmshim", b"label")
    (m / "newdir/emptydir").mkdir(parents=True)
    os.setxattr(m / "newdir", "user.dir", b"dir xattr")
    os.mkfifo(m / "fifo", 0o640)
    os.mknod(m / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (m / "tmp").mkdir()
    os.chmod(m / "tmp", 0o1777)
    _write(m / LONGNAME, "long name\n")
    _write(Path(os.fsdecode(bytes(m) + b"/" + BADNAME)), "bad name\n")
    _write(m / "empty", b"")
    os.utime(m / "new.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def _snapshot(root: Path) -> tuple[dict[bytes, tuple], set[frozenset[bytes]]]:
    """Everything restore must reproduce: per path, type/mode/owner/size/mtime/content/xattrs; and
    which paths share an inode."""
    entries: dict[bytes, tuple] = {}
    inodes: dict[tuple[int, int], set[bytes]] = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        mode = st.st_mode
        xattrs = {}
        if not stat.S_ISLNK(mode):
            xattrs = {
                n: os.getxattr(path, n)
                for n in os.listxattr(path)
                if n.startswith(("user.", "security.")) and not n.startswith("user.overlay.")
            }
        if stat.S_ISREG(mode):
            with open(path, "rb") as f:
                detail: object = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(mode):
            detail = os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            detail = st.st_rdev
        else:
            detail = None
        size = st.st_size if not stat.S_ISDIR(mode) else 0
        entries[rel] = (
            stat.S_IFMT(mode),
            stat.S_IMODE(mode),
            st.st_uid,
            st.st_gid,
            size,
            st.st_mtime_ns,
            detail,
            xattrs,
        )
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
        if stat.S_ISDIR(mode):
            for name in sorted(os.listdir(path)):
                visit(path + b"/" + name, rel + b"/" + name if rel else name)

    visit(os.fsencode(root), b"")
    return entries, {frozenset(v) for v in inodes.values() if len(v) > 1}


def _names(tar: Path) -> list[str]:
    with tarfile.open(tar) as tf:
        return tf.getnames()


def _fresh_copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


@pytest.mark.parametrize("target", ["copy", "overlay"])
def test_diff_round_trip_reproduces_the_merged_view(tmp_path: Path, mounts: list[Path], target: str) -> None:
    """Onto a copy of the image directory, and onto a new container's overlay of the same image."""
    _populate_lower(tmp_path / "lower")
    lower, upper, merged = _overlay(tmp_path, mounts)
    _change_merged(merged)
    tar = tmp_path / "diff.tar"

    stats = layer.capture_diff(str(upper), str(tar))

    names = _names(tar)
    assert "d/.wh.x" in names and ".wh.gone" in names
    assert "olddir/.wh..wh..opq" in names and "ld/.wh..wh..opq" in names
    assert names.index("olddir/.wh..wh..opq") < names.index("olddir/n")
    assert "keep.txt" in names and "deep/a/b/c/file" not in names  # only what the upper holds
    assert stats["deletions"] == 4
    assert tar.stat().st_size < 1 * MiB  # the 32 MiB sparse file did not inflate the diff

    if target == "copy":
        rootfs = tmp_path / "rootfs"
        _fresh_copy(lower, rootfs)
    else:
        _, _, rootfs = _overlay(tmp_path, mounts, suffix="2")
    applied = layer.apply_diff(str(tar), str(rootfs))

    assert applied["deletions"] == 4 and applied["xattrs_skipped"] == 0
    want_entries, want_links = _snapshot(merged)
    got_entries, got_links = _snapshot(rootfs)
    assert got_entries.keys() == want_entries.keys()
    for path, want in want_entries.items():
        assert got_entries[path] == want, path
    assert got_links == want_links
    assert {frozenset({b"h1", b"sub/h2"}), frozenset({b"keep.txt", b"keep-link"})} <= got_links
    assert os.stat(rootfs / "sparse.bin").st_blocks * 512 < 1 * MiB
    assert stat.S_IMODE(os.stat(rootfs / "bin/tool").st_mode) == 0o4755


def test_apply_diff_twice_is_idempotent(tmp_path: Path, mounts: list[Path]) -> None:
    _populate_lower(tmp_path / "lower")
    lower, upper, merged = _overlay(tmp_path, mounts)
    _change_merged(merged)
    tar = tmp_path / "diff.tar"
    layer.capture_diff(str(upper), str(tar))
    rootfs = tmp_path / "rootfs"
    _fresh_copy(lower, rootfs)
    layer.apply_diff(str(tar), str(rootfs))
    layer.apply_diff(str(tar), str(rootfs))
    assert _snapshot(rootfs) == _snapshot(merged)


def test_upperdir_of_finds_the_overlay(tmp_path: Path, mounts: list[Path]) -> None:
    (tmp_path / "lower").mkdir()
    lower, upper, merged = _overlay(tmp_path, mounts)
    assert layer.upperdir_of(str(merged)) == str(upper)
    assert layer.upperdir_of(str(merged) + "/") == str(upper)
    assert layer.upperdir_of(str(lower)) is None


def test_huge_sparse_file(tmp_path: Path) -> None:
    """Apparent size past the 8 GiB ustar limit, a few KiB of data: stays sparse both ways."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    size = 9 << 30
    with open(src / "huge", "wb") as f:
        f.write(b"start")
        f.seek(8 << 30)
        f.write(b"past 8 GiB")
        f.truncate(size)
    tar = tmp_path / "t.tar"
    layer.capture_tree(str(src), str(tar))
    assert tar.stat().st_size < 64 * 1024
    layer.apply_tree(str(tar), str(dst))
    st = os.stat(dst / "huge")
    assert st.st_size == size and st.st_blocks * 512 <= 64 * 1024
    with open(dst / "huge", "rb") as f:
        assert f.read(5) == b"start"
        f.seek(8 << 30)
        assert f.read(10) == b"past 8 GiB"
        f.seek(1 << 30)
        assert f.read(4096) == bytes(4096)


def _big_files(m: Path) -> None:
    """Files whose data may be copied after the resume: plain, hard-linked, and sparse with a
    data extent over the 256 KiB a capture always copies frozen."""
    _write(m / "big/one.bin", os.urandom(MiB + 3))
    _write(m / "big/two.bin", os.urandom(MiB))
    os.link(m / "big/two.bin", m / "big/two-link")
    with open(m / "big/sparse.bin", "wb") as f:
        f.seek(4 * MiB)
        f.write(os.urandom(MiB))
        f.truncate(8 * MiB)


def _start(
    upper: Path, out: Path, cold_after: float | None, cap: int | None = None, **kw: Any
) -> layer.Capture:
    (out.parent / "pending").mkdir(parents=True, exist_ok=True)
    return layer.start_capture(
        str(upper), str(out), cap, diff=True, cold_after=cold_after, tmp_dir=str(out.parent / "pending"), **kw
    )


def _read_in(capture: layer.Capture, out: Path) -> None:
    """What the reader of a published capture (the store) does: read the pinned files' data
    (into the tar's holes here), check, close."""
    with open(out, "r+b") as f:
        for at, fd, offset, count in capture.extents:
            f.seek(at)
            f.write(os.pread(fd, count, offset))
    capture.check()
    capture.close()


@pytest.mark.parametrize(("max_pinned", "align"), [(256, None), (1, None), (256, ALIGN)])
def test_pinned_files_are_left_out_of_the_tar_for_its_reader(
    tmp_path: Path, mounts: list[Path], monkeypatch: pytest.MonkeyPatch, max_pinned: int, align: int | None
) -> None:
    _populate_lower(tmp_path / "lower")
    lower, upper, merged = _overlay(tmp_path, mounts)
    _change_merged(merged)
    _big_files(merged)
    frozen = tmp_path / "frozen.tar"
    _start(upper, frozen, cold_after=None, align=align).publish()
    monkeypatch.setattr(layer, "_MAX_PINNED", max_pinned)
    fds = open_fds()
    out = tmp_path / "out" / "later.tar"
    out.parent.mkdir()

    capture = _start(upper, out, cold_after=0, align=align)

    assert not out.exists() and os.listdir(out.parent) == ["pending"]  # nothing half-made beside it
    if max_pinned == 1:
        assert len(open_fds() - fds) == 1 + 1  # the tar, one pinned file; the rest copied frozen
    stats = capture.publish()
    pinned = (MiB + 3) if max_pinned == 1 else (MiB + 3) + MiB + MiB  # one, two, sparse's extent
    assert stats["copied_later"] == sum(count for _, _, _, count in capture.extents) == pinned
    assert os.stat(out).st_blocks * 512 < os.stat(frozen).st_blocks * 512 - pinned + MiB // 4  # holes
    _read_in(capture, out)
    assert out.read_bytes() == frozen.read_bytes()
    assert open_fds() == fds and os.listdir(out.parent / "pending") == []
    rootfs = tmp_path / "rootfs"
    _fresh_copy(lower, rootfs)
    layer.apply_diff(str(out), str(rootfs))
    assert _snapshot(rootfs) == _snapshot(merged)


def test_big_files_start_at_multiples_of_align_and_read_back_the_same(
    tmp_path: Path, mounts: list[Path]
) -> None:
    """With align (the store's chunk size), every file of at least that size has its data at a
    multiple of it, so the store cuts it into the same chunks whatever comes before it; tarfile,
    GNU tar and apply_diff read the tar as before. The padding is not held against the cap."""
    _populate_lower(tmp_path / "lower")
    lower, upper, merged = _overlay(tmp_path, mounts)
    _change_merged(merged)
    _big_files(merged)
    _write(merged / ("b" * 120 + ".bin"), os.urandom(ALIGN + 5))  # its own pax records: path, xattr
    os.setxattr(merged / ("b" * 120 + ".bin"), "user.big", b"kept")
    plain, aligned = tmp_path / "plain.tar", tmp_path / "aligned.tar"
    _start(upper, plain, cold_after=None).publish()

    _start(upper, aligned, cold_after=None, align=ALIGN, cap=plain.stat().st_size).publish()

    with tarfile.open(aligned) as tf:
        members = tf.getmembers()
        big = [m for m in members if m.isreg() and m.size >= ALIGN and not m.issparse()]
        assert len(big) >= 3 and all(m.offset_data % ALIGN == 0 for m in big)
        assert tf.extractfile("b" * 120 + ".bin").read() == (merged / ("b" * 120 + ".bin")).read_bytes()
    assert [m.name for m in members] == _names(plain)
    assert (
        aligned.stat().st_size > plain.stat().st_size
        and os.stat(aligned).st_blocks * 512 < 2 * plain.stat().st_size
    )
    rootfs = tmp_path / "rootfs"
    _fresh_copy(lower, rootfs)
    layer.apply_diff(str(aligned), str(rootfs))
    assert _snapshot(rootfs) == _snapshot(merged)
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=user.*", "-xf", str(aligned), "-C", str(gnu)], check=True
    )
    for m in big:
        assert (gnu / m.name).read_bytes() == (merged / m.name).read_bytes(), m.name
    assert os.getxattr(gnu / ("b" * 120 + ".bin"), "user.big") == b"kept"


@pytest.mark.parametrize("pin", [True, False])
def test_cold_files_unchanged_since_the_last_capture_are_left_as_holes(
    tmp_path: Path, mounts: list[Path], pin: bool
) -> None:
    """The next capture leaves out the whole chunks of a cold file whose identity the caller
    names unchanged (a tail shorter than a chunk is still copied) and says where they were."""
    (tmp_path / "lower").mkdir()
    _, upper, merged = _overlay(tmp_path, mounts)
    _write(merged / "reads.fastq", os.urandom(3 * ALIGN + 100))
    _write(merged / "ref.fa", os.urandom(2 * ALIGN))
    first = _start(upper, tmp_path / "a" / "t.tar", cold_after=0, align=ALIGN).publish()
    (reads, ref) = sorted(first["aligned"].items(), key=lambda kv: kv[1])  # tar order: reads first
    assert [reads[1][1], ref[1][1]] == [3, 2]

    capture = _start(
        upper, tmp_path / "b" / "t.tar", cold_after=0, align=ALIGN, pin=pin, unchanged=[reads[0]]
    )
    second = capture.publish()
    _read_in(capture, tmp_path / "b" / "t.tar")

    assert capture.reused == {reads[0]: reads[1][0]} and second["reused"] == 3 * ALIGN
    assert second["aligned"] == first["aligned"]
    with tarfile.open(tmp_path / "b" / "t.tar") as tf:
        got = tf.extractfile("reads.fastq").read()
        assert tf.extractfile("ref.fa").read() == (merged / "ref.fa").read_bytes()
    want = (merged / "reads.fastq").read_bytes()
    assert got == bytes(3 * ALIGN) + want[3 * ALIGN :]  # the previous chunks fill the hole
    os.utime(merged / "reads.fastq")  # a new ctime: no longer the file the key names
    third = _start(upper, tmp_path / "c" / "t.tar", cold_after=0, align=ALIGN, unchanged=[reads[0]]).publish()
    assert third["reused"] == 0


def test_recently_changed_files_are_copied_frozen(tmp_path: Path, mounts: list[Path]) -> None:
    (tmp_path / "lower").mkdir()
    _, upper, merged = _overlay(tmp_path, mounts)
    _big_files(merged)
    capture = _start(upper, tmp_path / "t.tar", cold_after=3600)
    assert capture.publish()["copied_later"] == 0 and capture.extents == []


def _append(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"more")


def _overwrite(p: Path) -> None:
    with open(p, "r+b") as f:
        f.write(b"same size, other bytes")


def _replace(p: Path) -> None:
    _write(p.with_suffix(".new"), b"written after the resume")
    os.rename(p.with_suffix(".new"), p)


@pytest.mark.parametrize(
    "change",
    [_append, _overwrite, lambda p: os.truncate(p, 10), lambda p: p.chmod(0o600), _replace, Path.unlink],
    ids=["append", "overwrite", "truncate", "chmod", "replace", "unlink"],
)
def test_a_pinned_file_changed_after_the_freeze_fails_the_check(
    tmp_path: Path, mounts: list[Path], change: Callable[[Path], None]
) -> None:
    (tmp_path / "lower").mkdir()
    _, upper, merged = _overlay(tmp_path, mounts)
    _big_files(merged)
    fds = open_fds()
    capture = _start(upper, tmp_path / "t.tar", cold_after=0)
    capture.publish()
    capture.check()  # unchanged so far
    st = os.stat(upper / "big/one.bin")
    change(merged / "big/one.bin")  # the job, running again, before the reader is done

    with pytest.raises(layer.LayerChanged, match=r"big/one\.bin") as raised:
        capture.check()

    assert raised.value.inodes == [(st.st_dev, st.st_ino)]  # for the next capture's copy_now
    capture.close()
    assert open_fds() == fds and os.listdir(tmp_path / "pending") == []


def test_files_seen_changing_while_pinned_are_copied_frozen(tmp_path: Path, mounts: list[Path]) -> None:
    """copy_now names files that changed while pinned last time: the next capture copies them
    frozen, and pins the other cold files as before."""
    (tmp_path / "lower").mkdir()
    _, upper, merged = _overlay(tmp_path, mounts)
    _big_files(merged)
    frozen = tmp_path / "frozen.tar"
    _start(upper, frozen, cold_after=None).publish()
    st = os.stat(upper / "big/one.bin")
    out = tmp_path / "out" / "t.tar"

    capture = _start(upper, out, cold_after=0, copy_now=[(st.st_dev, st.st_ino)])

    stats = capture.publish()
    assert stats["copied_later"] == sum(n for *_, n in capture.extents) == MiB + MiB  # two, sparse
    _read_in(capture, out)
    assert out.read_bytes() == frozen.read_bytes()


def test_pinned_files_need_no_room_beside_the_tar(tmp_path: Path, mounts: list[Path]) -> None:
    """A job's staged inputs may be bigger than the disk the tar goes to: only what is copied
    frozen takes room there. Frozen copies of the same files do not fit."""
    (tmp_path / "lower").mkdir()
    _, upper, merged = _overlay(tmp_path, mounts)
    _big_files(merged)
    whole = tmp_path / "whole.tar"
    _start(upper, whole, cold_after=None).publish()
    small = tmp_path / "small"
    small.mkdir()
    _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small))
    mounts.append(small)
    with pytest.raises(LayerError, match="No space left"):
        _start(upper, small / "frozen.tar", cold_after=None)
    fds = open_fds()

    capture = _start(upper, small / "t.tar", cold_after=0)
    capture.publish()

    got = bytearray((small / "t.tar").read_bytes())
    for at, fd, offset, count in capture.extents:
        got[at : at + count] = os.pread(fd, count, offset)
    assert got == whole.read_bytes()
    capture.close()
    assert open_fds() == fds and sorted(os.listdir(small)) == ["pending", "t.tar"]


def test_an_unpublished_capture_leaves_nothing_open(tmp_path: Path, mounts: list[Path]) -> None:
    (tmp_path / "lower").mkdir()
    _, upper, merged = _overlay(tmp_path, mounts)
    _big_files(merged)
    fds = open_fds()
    capture = _start(upper, tmp_path / "t.tar", cold_after=0)
    capture.close()
    assert open_fds() == fds and not (tmp_path / "t.tar").exists()
    assert os.listdir(tmp_path / "pending") == []


def test_octal_fields_overflow_to_base256() -> None:
    assert tarfile.nti(layer._octal(0o755, 8)) == 0o755
    assert tarfile.nti(layer._octal(9 << 30, 12)) == 9 << 30  # a size GNU tar and tarfile both read


def test_upperdir_of_unescapes_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /run rw - tmpfs tmpfs rw\n"
        "40 22 0:50 / /run/my\\040root rw,relatime shared:5 - overlay overlay "
        "rw,lowerdir=/l\\054x:/l2,upperdir=/var/up\\054per\\040dir,workdir=/var/w\n"
        "41 22 0:51 / /run/plain rw - overlay overlay rw,lowerdir=/a:/b\n"
    )
    assert layer.upperdir_of("/run/my root", mountinfo=str(info)) == "/var/up,per dir"
    assert layer.upperdir_of("/run/plain", mountinfo=str(info)) is None  # read-only overlay
    assert layer.upperdir_of("/run", mountinfo=str(info)) is None


def test_metacopy_upper_is_refused(tmp_path: Path, mounts: list[Path]) -> None:
    _write(tmp_path / "lower/f", "data\n")
    try:
        _, upper, merged = _overlay(tmp_path, mounts, ",metacopy=on")
    except subprocess.CalledProcessError:
        pytest.skip("kernel without overlay metacopy")
    os.chmod(merged / "f", 0o600)
    with pytest.raises(LayerError, match="metacopy"):
        layer.capture_diff(str(upper), str(tmp_path / "d.tar"))
    assert not (tmp_path / "d.tar").exists()


def _fill_shm(shm: Path) -> None:
    os.chmod(shm, 0o1777)
    _write(shm / "sem.x", b"\x01" * 4096, 0o600)
    os.chown(shm / "sem.x", 1000, 1000)
    with open(shm / "big-sparse", "wb") as f:
        f.seek(8 * MiB)
        f.write(b"tail")
    _write(shm / "sub/deeper/f", "f\n")
    os.link(shm / "sub/deeper/f", shm / "f-link")
    (shm / "sym").symlink_to("sub/deeper/f")
    os.mkfifo(shm / "fifo")
    os.setxattr(shm / "sem.x", "user.k", b"v")


def _free(path: Path) -> int:
    os.sync()  # XFS allocates at writeback
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def test_big_files_share_their_blocks_where_the_file_system_can(tmp_path: Path) -> None:
    """On XFS with reflink (mkfs.xfs's default since xfsprogs 5.1), a big file copied into
    a tar (frozen: recently written, or at a Spot notice) and laid from it onto a new tree shares
    its blocks, as its data starts at a multiple of the chunk size: neither copy takes room or
    time. The bytes are the same. (Elsewhere the kernel copies, as every other test shows.)"""
    with xfs(tmp_path / "xfs") as disk:
        data = os.urandom(64 * MiB + 5)
        _write(disk / "src" / "input.bin", data)
        _write(disk / "src" / "log.txt", "small, copied\n")
        free = _free(disk)

        layer.capture_tree(str(disk / "src"), str(disk / "t.tar"), align=4 * MiB)
        (disk / "dst").mkdir()
        layer.apply_tree(str(disk / "t.tar"), str(disk / "dst"), consume=True)

        assert free - _free(disk) < MiB  # not the 128 MiB two copies would take
        assert (disk / "dst" / "input.bin").read_bytes() == data
        assert (disk / "dst" / "log.txt").read_text() == "small, copied\n"


@pytest.mark.parametrize("kernel", ["EXDEV", "reads nothing"])
def test_copies_fall_back_where_copy_file_range_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    """Across file systems copy_file_range fails with EXDEV; on procfs before Linux 5.19 it
    returns 0 as if at the end. Either way the data is copied by sendfile, whole."""

    def copy_file_range(*args: Any) -> int:
        if kernel == "EXDEV":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return 0

    monkeypatch.setattr(layer.os, "copy_file_range", copy_file_range)
    data = os.urandom(3 * MiB + 3)
    _write(tmp_path / "src" / "big.bin", data)
    layer.capture_tree(str(tmp_path / "src"), str(tmp_path / "t.tar"), align=ALIGN)
    (tmp_path / "dst").mkdir()
    layer.apply_tree(str(tmp_path / "t.tar"), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "big.bin").read_bytes() == data


def test_tree_round_trip_tmpfs(tmp_path: Path, mounts: list[Path]) -> None:
    src, dst = tmp_path / "shm", tmp_path / "shm2"
    for d in (src, dst):
        d.mkdir()
        _mount("-t", "tmpfs", "-o", "size=32m", "tmpfs", str(d))
        mounts.append(d)
    _fill_shm(src)
    tar = tmp_path / "shm.tar"

    stats = layer.capture_tree(str(src), str(tar))
    assert stats["files"] == 9 and stats["deletions"] == 0
    assert tar.stat().st_size < 64 * 1024

    layer.apply_tree(str(tar), str(dst))
    assert _snapshot(dst) == _snapshot(src)
    assert os.stat(dst / "big-sparse").st_blocks * 512 <= 64 * 1024


def test_tree_keeps_or_clears_existing(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _write(src / "a", "a\n")
    _write(dst / "stale", "old\n")
    _write(dst / "a", "to be replaced\n")
    tar = tmp_path / "t.tar"
    layer.capture_tree(str(src), str(tar))
    layer.apply_tree(str(tar), str(dst))
    assert sorted(os.listdir(dst)) == ["a", "stale"] and (dst / "a").read_text() == "a\n"
    layer.apply_tree(str(tar), str(dst), clear=True)
    assert _snapshot(dst) == _snapshot(src)


def test_capture_tree_does_not_descend_into_mounts(tmp_path: Path, mounts: list[Path]) -> None:
    src = tmp_path / "src"
    _write(src / "top", "t\n")
    (src / "mnt").mkdir()
    _mount("-t", "tmpfs", "tmpfs", str(src / "mnt"))
    mounts.append(src / "mnt")
    _write(src / "mnt/inside", "i\n")
    layer.capture_tree(str(src), str(tmp_path / "t.tar"))
    assert sorted(_names(tmp_path / "t.tar")) == [".", "mnt", "top"]


@pytest.mark.parametrize("diff", [False, True])
def test_too_large_leaves_nothing(tmp_path: Path, diff: bool) -> None:
    src = tmp_path / "src"
    _write(src / "small", "s\n")
    _write(src / "big", os.urandom(64 * 1024))
    out = tmp_path / "out" / "layer.tar"
    out.parent.mkdir()
    capture = layer.capture_diff if diff else layer.capture_tree
    with pytest.raises(TooLarge, match="exceeds the limit of 40000 bytes"):
        capture(str(src), str(out), max_bytes=40_000)
    assert os.listdir(out.parent) == []
    stats = capture(str(src), str(out), max_bytes=80_000)
    assert stats["tar_bytes"] == out.stat().st_size <= 80_000


# ------------------------------------------------------------------------------- hostile archives

Entry = tuple[str, bytes, str | bytes]  # (name, tar type, data or link target)


def _hostile_tar(path: Path, entries: list[Entry]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            data = None
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = str(payload)
            elif kind == tarfile.REGTYPE:
                raw = payload.encode() if isinstance(payload, str) else payload
                info.size = len(raw)
                data = io.BytesIO(raw)
            tf.addfile(info, data)


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A rootfs and, beside it, a sentinel directory that nothing may touch."""
    root, sentinel = tmp_path / "root", tmp_path / "sentinel"
    root.mkdir()
    _write(sentinel / "keep", "precious\n")
    yield root, sentinel
    assert sorted(os.listdir(sentinel)) == ["keep"]
    assert (sentinel / "keep").read_text() == "precious\n"
    assert os.lstat(sentinel / "keep").st_nlink == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "evil").exists()
    assert not os.path.lexists("/etc/mmshim-layer-evil")


APPLIERS: list[Callable[[str, str], dict]] = [layer.apply_diff, layer.apply_tree]
REG, DIR, SYM, LNK = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


@pytest.mark.parametrize("apply", APPLIERS, ids=["diff", "tree"])
@pytest.mark.parametrize(
    "entries",
    [
        [("../x", REG, "evil")],
        [("/etc/mmshim-layer-evil", REG, "evil")],
        [("{sentinel}/evil", REG, "evil")],
        [("a/../../x", REG, "evil")],
        [("ok", REG, "fine"), ("./../evil", REG, "evil")],
        [("a", SYM, "/"), ("a/{sentinel_rel}/evil", REG, "evil")],
        [("a", SYM, "{sentinel}"), ("a/evil", REG, "evil")],
        [("a", DIR, ""), ("a/b", SYM, "../../sentinel"), ("a/b/evil", REG, "evil")],
        [("h", LNK, "/etc/passwd")],
        [("h", LNK, "../sentinel/keep")],
        [("h", LNK, "{sentinel}/keep")],
        [("h", LNK, "present")],  # a rootfs file, not an entry of this archive
        [("etc/passwd", REG, "root::0:0::/:/bin/sh\n")],  # etc is a symlink out of the rootfs
    ],
    ids=[
        "dotdot",
        "absolute",
        "absolute-sentinel",
        "inner-dotdot",
        "late-dotdot",
        "symlink-root",
        "symlink-abs",
        "symlink-rel",
        "hardlink-abs",
        "hardlink-dotdot",
        "hardlink-abs-sentinel",
        "hardlink-foreign",
        "rootfs-symlink-parent",
    ],
)
def test_hostile_archive_is_refused(
    tmp_path: Path, arena: tuple[Path, Path], apply: Callable[[str, str], dict], entries: list[Entry]
) -> None:
    root, sentinel = arena
    (root / "etc").symlink_to(sentinel)
    _write(root / "present", "p\n")
    fmt = {"sentinel": str(sentinel), "sentinel_rel": str(sentinel).lstrip("/")}
    entries = [(n.format(**fmt), k, p.format(**fmt) if isinstance(p, str) else p) for n, k, p in entries]
    tar = tmp_path / "evil.tar"
    _hostile_tar(tar, entries)
    with pytest.raises(LayerError, match="refusing"):
        apply(str(tar), str(root))
    if any(".." in n.split("/") or n.startswith("/") for n, _, _ in entries):
        assert not (root / "ok").exists()  # paths are checked before anything is written
    assert os.readlink(root / "etc") == str(sentinel)


@pytest.mark.parametrize("apply", APPLIERS, ids=["diff", "tree"])
def test_rootfs_symlinks_are_replaced_not_followed(
    tmp_path: Path, arena: tuple[Path, Path], apply: Callable[[str, str], dict]
) -> None:
    root, sentinel = arena
    (root / "etc").symlink_to(sentinel)
    (root / "victim").symlink_to(sentinel / "keep")
    (root / "newfile").symlink_to(sentinel / "evil")
    tar = tmp_path / "t.tar"
    _hostile_tar(
        tar,
        [
            ("etc", DIR, ""),
            ("etc/passwd", REG, "root\n"),
            ("victim", REG, "mine\n"),
            ("newfile", REG, "mine\n"),
            ("s", SYM, str(sentinel)),
            ("s", REG, "over\n"),
            ("hl", LNK, "victim"),
        ],
    )
    apply(str(tar), str(root))
    assert (root / "etc").is_dir() and not (root / "etc").is_symlink()
    assert (root / "etc/passwd").read_text() == "root\n"
    for name in ("victim", "newfile", "s"):
        assert not (root / name).is_symlink()
    assert (root / "victim").read_text() == "mine\n" and (root / "s").read_text() == "over\n"
    assert os.stat(root / "hl").st_ino == os.stat(root / "victim").st_ino


@pytest.mark.parametrize("marker", ["link/.wh.keep", "link/.wh..wh..opq", "link/sub/.wh..wh..opq"])
def test_deletions_never_follow_symlinks(tmp_path: Path, arena: tuple[Path, Path], marker: str) -> None:
    root, sentinel = arena
    (root / "link").symlink_to(sentinel)
    tar = tmp_path / "t.tar"
    _hostile_tar(tar, [(marker, REG, "")])
    layer.apply_diff(str(tar), str(root))
    assert os.readlink(root / "link") == str(sentinel)


@pytest.mark.parametrize(
    "entries",
    [
        [(".wh...", REG, "")],
        [("d/.wh.", REG, "")],
        [(".wh.dir", DIR, "")],
        [(".wh.a/b", REG, "")],
    ],
    ids=["whiteout-dotdot", "whiteout-empty", "whiteout-dir", "whiteout-parent"],
)
def test_bad_whiteouts_are_refused(tmp_path: Path, arena: tuple[Path, Path], entries: list[Entry]) -> None:
    root, _ = arena
    _write(root / "a", "a\n")
    tar = tmp_path / "t.tar"
    _hostile_tar(tar, entries)
    with pytest.raises(LayerError, match="refusing"):
        layer.apply_diff(str(tar), str(root))
    assert (root / "a").read_text() == "a\n"


def test_garbage_is_a_layer_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 100)
    (tmp_path / "root").mkdir()
    with pytest.raises(LayerError, match="cannot read"):
        layer.apply_tree(str(bad), str(tmp_path / "root"))


# ------------------------------------------------------------------------------------ revert_diff


def _assert_same_tree(got_root: Path, want_root: Path) -> None:
    want_entries, want_links = _snapshot(want_root)
    got_entries, got_links = _snapshot(got_root)
    assert sorted(got_entries) == sorted(want_entries)
    for path, want in want_entries.items():
        assert got_entries[path] == want, path
    assert got_links == want_links


def _image_extras(lower: Path) -> None:
    """More for revert_diff to put back: owners, modes, a directory's xattrs, hard links, holes."""
    _write(lower / "owned/f", "owned\n", 0o640)
    os.chown(lower / "owned/f", 1000, 1001)
    os.chown(lower / "owned", 1000, 1001)
    os.chmod(lower / "owned", 0o750)
    os.setxattr(lower / "d", "user.dir", b"image dir")
    os.link(lower / "gone/z", lower / "gone/sub/z-link")
    with open(lower / "gone/sparse", "wb") as f:
        f.write(b"data")
        f.truncate(8 * MiB)
    os.utime(lower / "keep.txt", ns=(1, 1_500_000_000_987_654_321))
    os.utime(lower / "d", ns=(1, 1_400_000_000_000_000_001))


def _change_image_paths(m: Path) -> None:
    """Changes to what the image has, beyond _change_merged's."""
    os.chmod(m / "owned", 0o777)
    os.chown(m / "owned/f", 0, 0)
    os.setxattr(m / "d", "user.dir", b"changed")
    os.setxattr(m / "d", "user.extra", b"added")
    (m / "keep.txt").write_text("overwritten\n")
    _write(m / "deep/a/b/c/file", "rewritten\n")
    _write(m / "deep/a/b/new/n", "n\n")
    os.chmod(m, 0o700)


def _image_and_its_diff(tmp_path: Path, mounts: list[Path], big: int = 0) -> tuple[Path, Path, Path]:
    """An image (lower) changed in every way through an overlay, and with ``big`` random bytes
    in big.bin: (lower, merged view, diff tar)."""
    lower = tmp_path / "lower"
    _populate_lower(lower)
    _image_extras(lower)
    _, upper, merged = _overlay(tmp_path, mounts)
    _change_merged(merged)
    _change_image_paths(merged)
    if big:
        (merged / "big.bin").write_bytes(os.urandom(big))
    tar = tmp_path / "diff.tar"
    layer.capture_diff(str(upper), str(tar))
    return lower, merged, tar


def test_revert_diff_gives_back_the_image(tmp_path: Path, mounts: list[Path]) -> None:
    """Checkpoint diff laid on a fresh overlay of the image, then reverted: the image, exactly."""
    lower, merged, tar = _image_and_its_diff(tmp_path, mounts)
    _, upper2, rootfs = _overlay(tmp_path, mounts, suffix="2")
    layer.apply_diff(str(tar), str(rootfs))
    assert _snapshot(rootfs) == _snapshot(merged)

    lowers = layer.lowerdirs_of(str(rootfs))
    assert lowers == [str(lower)]
    stats = layer.revert_diff(str(tar), str(rootfs), lowers)

    _assert_same_tree(rootfs, lower)
    assert os.stat(rootfs / "gone/sparse").st_blocks * 512 < 1 * MiB
    assert os.lstat(rootfs / "gone/z").st_nlink == 2
    assert not (upper2 / "d/y").exists() and not (upper2 / "deep/a/b/c/x").exists()  # no copy-up
    assert stats["removed"] >= 20 and stats["restored"] >= 20
    assert layer.revert_diff(str(tar), str(rootfs), lowers)["removed"] > 0  # idempotent in effect
    _assert_same_tree(rootfs, lower)


def test_a_consumed_archive_applies_alike_frees_its_data_and_still_reverts(
    tmp_path: Path, mounts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """apply_diff(consume=True), as a restore runs it: the same tree as without; the archive's
    data is punched out as it is copied, a big file's step by step (so the layer needs room once,
    not twice), and its headers stay, so that revert_diff still gives the image back."""
    lower, merged, tar = _image_and_its_diff(tmp_path, mounts, big=5 * MiB + 123)
    size = tar.stat().st_size
    punched: list[tuple[int, int]] = []
    punch = libc.punch_hole
    monkeypatch.setattr(layer, "_CONSUME_STEP", MiB)
    monkeypatch.setattr(libc, "punch_hole", lambda fd, at, n: (punched.append((at, n)), punch(fd, at, n)))
    _, _, rootfs = _overlay(tmp_path, mounts, suffix="2")

    layer.apply_diff(str(tar), str(rootfs), consume=True)

    assert _snapshot(rootfs) == _snapshot(merged)
    with tarfile.open(tar) as tf:  # the headers are all still there, the data gone
        start = tf.getmember("big.bin").offset_data
    assert [n for at, n in punched if at == start] == [*(i * MiB for i in range(1, 6)), 5 * MiB + 123]
    assert tar.stat().st_size == size and tar.stat().st_blocks * 512 < MiB // 4
    layer.revert_diff(str(tar), str(rootfs), layer.lowerdirs_of(str(rootfs)))
    _assert_same_tree(rootfs, lower)


def test_revert_diff_onto_a_plain_directory_takes_the_kept_image(tmp_path: Path, mounts: list[Path]) -> None:
    """A rootfs that is no overlay (runc bundles, Docker's vfs driver): keep_image links its image
    beside it before the diff is laid on, and revert_diff gives the image back from there."""
    lower, merged, tar = _image_and_its_diff(tmp_path, mounts)
    rootfs = tmp_path / "rootfs"
    _fresh_copy(lower, rootfs)
    assert layer.lowerdirs_of(str(rootfs)) == []

    kept = layer.keep_image(str(rootfs))
    _assert_same_tree(Path(kept), rootfs)
    assert Path(kept).parent == tmp_path
    layer.apply_diff(str(tar), str(rootfs))
    assert _snapshot(rootfs) == _snapshot(merged)
    layer.revert_diff(str(tar), str(rootfs), [kept])
    shutil.rmtree(kept)

    _assert_same_tree(rootfs, lower)
    assert os.lstat(rootfs / "gone/z").st_nlink == 2


def test_keep_image_of_a_mounted_rootfs_fails_and_leaves_nothing(tmp_path: Path, mounts: list[Path]) -> None:
    """Links cannot leave a filesystem: a rootfs that is a mount of its own cannot be kept so."""
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    _mount("-t", "tmpfs", "tmpfs", str(rootfs))
    mounts.append(rootfs)
    _write(rootfs / "bin/tool", "#!/bin/sh\n", 0o755)
    with pytest.raises(
        layer.LayerError, match=r"cannot keep the image of .*rootfs \(no overlay\).*Invalid cross-device"
    ):
        layer.keep_image(str(rootfs))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs"]


def test_revert_diff_over_several_layers(tmp_path: Path, mounts: list[Path]) -> None:
    """A whiteout, an opaque directory and a file over a directory in the upper image layer hide
    what lies below them, both when looking a path up and when refilling a directory."""
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    _write(bottom / "base.txt", "base\n")
    _write(bottom / "hidden.txt", "must stay hidden\n")
    _write(bottom / "dir/a", "a from bottom\n")
    _write(bottom / "opq/old", "hidden by the opaque dir\n")
    _write(bottom / "shadow/x", "under a file\n")
    _write(bottom / "dir2/keep", "keep\n")
    _write(top / "dir/b", "b from top\n")
    os.setxattr(top / "dir", "user.layer", b"top")
    _write(top / "opq/new", "new\n")
    os.setxattr(top / "opq", "trusted.overlay.opaque", b"y")
    os.mknod(top / "hidden.txt", stat.S_IFCHR | 0o600, 0)  # an overlay whiteout
    _write(top / "shadow", "a file over a directory\n")
    _write(top / "dir2/gone", "gone\n")

    def mount(name: str, upper: bool = True) -> tuple[Path, Path]:
        up, work, merged = (tmp_path / f"{name}-{n}" for n in ("upper", "work", "merged"))
        for d in (up, work, merged):
            d.mkdir()
        opts = f"lowerdir={top}:{bottom}" + (f",upperdir={up},workdir={work}" if upper else "")
        _mount("-t", "overlay", "overlay", "-o", opts, str(merged))
        mounts.append(merged)
        return up, merged

    _, image = mount("image", upper=False)  # the image itself, read-only
    assert sorted(os.listdir(image)) == ["base.txt", "dir", "dir2", "opq", "shadow"]
    upper, ck = mount("checkpoint")
    (ck / "hidden.txt").write_text("resurrected\n")
    subprocess.run(["rm", "-rf", str(ck / "dir"), str(ck / "opq"), str(ck / "shadow")], check=True)
    _write(ck / "dir/z", "z\n")
    _write(ck / "opq/old", "not the image's\n")
    _write(ck / "shadow/y", "y\n")
    (ck / "base.txt").write_text("changed\n")
    (ck / "dir2/gone").unlink()
    tar = tmp_path / "diff.tar"
    layer.capture_diff(str(upper), str(tar))
    _, rootfs = mount("fresh")
    layer.apply_diff(str(tar), str(rootfs))
    assert (rootfs / "hidden.txt").exists() and not (rootfs / "dir/a").exists()

    lowers = layer.lowerdirs_of(str(rootfs))
    assert lowers == [str(top), str(bottom)]
    layer.revert_diff(str(tar), str(rootfs), lowers)

    _assert_same_tree(rootfs, image)
    assert sorted(os.listdir(rootfs / "dir")) == ["a", "b"] and os.listdir(rootfs / "opq") == ["new"]
    assert os.getxattr(rootfs / "dir", "user.layer") == b"top"


def test_lowerdirs_of_parses_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "40 22 0:50 / /run/a rw - overlay overlay "
        "rw,lowerdir=/l\\134:1:/l\\0402:/l\\134\\1343\\0543::/data,upperdir=/u,workdir=/w\n"
        "41 22 0:51 / /run/b rw - overlay overlay rw,lowerdir+=/x:y,lowerdir+=/z,datadir+=/d\n"
        "42 22 0:52 / /run/c rw - tmpfs tmpfs rw\n"
    )
    assert layer.lowerdirs_of("/run/a", mountinfo=str(info)) == ["/l:1", "/l 2", "/l\\3,3"]
    assert layer.lowerdirs_of("/run/b", mountinfo=str(info)) == ["/x:y", "/z"]
    assert layer.lowerdirs_of("/run/c", mountinfo=str(info)) == []
    assert layer.upperdir_of("/run/a", mountinfo=str(info)) == "/u"


@pytest.mark.parametrize("opaque_root", [False, True])
def test_revert_diff_never_follows_symlinks(
    tmp_path: Path, arena: tuple[Path, Path], opaque_root: bool
) -> None:
    """Links out of the rootfs, made by the container or named by the archive, and links out of an
    image layer are removed or recreated, never followed; also when the whole root is refilled."""
    root, sentinel = arena
    image = tmp_path / "image"
    _write(image / "etc/passwd", "image passwd\n")
    (image / "ld").symlink_to(sentinel)
    (image / "abs").symlink_to("/etc")
    subprocess.run(["cp", "-a", f"{image}/.", str(root)], check=True)
    subprocess.run(["rm", "-rf", str(root / "etc"), str(root / "ld"), str(root / "abs")], check=True)
    (root / "etc").symlink_to(sentinel)
    (root / "link").symlink_to(sentinel)
    _write(root / "ld/keep", "the container's\n")
    _write(root / "abs/passwd", "the container's\n")
    tar = tmp_path / "t.tar"
    _hostile_tar(
        tar,
        [
            ("etc/keep", REG, "x"),
            ("link/.wh..wh..opq", REG, ""),
            ("link/sub/.wh.keep", REG, ""),
            ("ld/keep", REG, "x"),
            ("abs/passwd", REG, "x"),
            ("abs/hostname", REG, "x"),
            *([(".wh..wh..opq", REG, "")] if opaque_root else []),
        ],
    )
    stats = layer.revert_diff(str(tar), str(root), [str(image)])
    _assert_same_tree(root, image)
    assert stats == {"removed": 4, "restored": 5}  # the root, etc, etc/passwd, ld, abs


@pytest.mark.parametrize(
    "entries",
    [
        [("ok", REG, "fine"), ("../x", REG, "evil")],
        [("ok", REG, "fine"), ("/etc/mmshim-layer-evil", REG, "evil")],
        [("ok", REG, "fine"), ("a/../../x", REG, "evil")],
        [("ok", REG, "fine"), ("d/.wh..", REG, "")],
        [("ok", REG, "fine"), ("h", LNK, "../sentinel/keep")],
    ],
    ids=["dotdot", "absolute", "inner-dotdot", "whiteout-dotdot", "hardlink-dotdot"],
)
def test_revert_diff_refuses_hostile_archives(
    tmp_path: Path, arena: tuple[Path, Path], entries: list[Entry]
) -> None:
    root, sentinel = arena
    _write(root / "ok", "the container's\n")
    before = _snapshot(root)
    tar = tmp_path / "evil.tar"
    _hostile_tar(tar, entries)
    with pytest.raises(LayerError, match="refusing"):
        layer.revert_diff(str(tar), str(root), [str(sentinel)])
    assert _snapshot(root) == before

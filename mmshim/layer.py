"""Carry a container's writable layer and chosen mount contents to a new host.

CRIU's image holds neither the overlay upperdir nor the contents of bind mounts such as Docker's
/dev/shm, and on restore CRIU checks that every open file still has the size it had. So the engine
captures those trees as tar files while the container is frozen and lays them onto the new
container's rootfs (or mount sources) before `runc restore`. A capture may leave the data of big
files the job has not changed for a while out of the tar, for its reader (the store) to read
once the job runs again (start_capture): they are held open, and checked unchanged after the read.

Tar representation (GNU tar 1.34 and Python's tarfile read it back exactly, sparse files included):

* POSIX pax (ustar + per-entry `x` headers). Numeric uid/gid only, no user names (the ids are the
  container's). Nanosecond mtimes in pax `mtime`. Extended attributes in `SCHILY.xattr.<name>` (raw
  bytes, GNU tar/star convention): user.*, security.* and the POSIX ACL xattrs; never the overlay's
  own trusted.overlay.* / user.overlay.*.
* Deletions in a diff use the OCI image-layer convention: an overlay whiteout (char device 0:0)
  becomes an empty regular file `<dir>/.wh.<name>`; an opaque directory (overlay.opaque=y) is
  followed by an empty `<dir>/.wh..wh..opq` marker, before the directory's children.
* Sparse regular files use GNU's pax sparse format 1.0 (GNU.sparse.major=1, minor=0, name,
  realsize, then a decimal map block and only the data extents); holes are found with
  SEEK_DATA/SEEK_HOLE and re-created on apply by seeking and ftruncate(). A 1 GiB file with 4 KiB
  of data costs about 6 KiB of tar. An entry storing 8 GiB or more gets a base-256 size field (GNU
  extension) rather than a pax `size` record, which Python's tarfile mishandles for sparse entries.
  (tarfile itself cannot write sparse entries at all, hence our own writer.)
* With align (the store's chunk size), the data of each regular, not sparse, file of at least that
  size starts at a multiple of it in the tar: its pax header gets a `comment` record (which readers
  ignore) as filler, written as a hole. Such a file then makes the same chunks in every checkpoint.
* Hard links: the first path seen is stored, later ones are `1` (link) entries naming it.
* Sockets are skipped (counted in stats["skipped"]): they cannot be archived, CRIU re-binds them.
* Mount points below the captured directory are recorded as directories, not descended into.
* atime is not carried: apply sets it to the mtime.

Capture writes headers ourselves and moves file data with sendfile(), so a big file never passes
through Python; small files are batched into 1 MiB writes. Apply parses headers with tarfile and
copies data from the raw tar with sendfile(). Every path is resolved from the destination root one
component at a time with O_NOFOLLOW, so no symlink, whether from the image or from the archive, is
ever followed while writing or deleting. Archives with absolute paths, `..` components or hard
links to anything but an earlier entry are refused before anything is written; an entry whose
parent turns out to be a symlink is refused when reached (LayerError, nothing written outside).

If `runc restore` then fails, revert_diff puts the image's version of every path the diff touched
back through the same mount (the layers from lowerdirs_of), so the job can start afresh.
"""

import contextlib
import errno
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass

from mmshim import libc

BLOCK = 512
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
XATTR_PAX_PREFIX = "SCHILY.xattr."
_ACL_XATTRS = frozenset({"system.posix_acl_access", "system.posix_acl_default"})
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_FLUSH_AT = 1 << 20  # buffered header/small-file bytes before one write()
_SMALL_FILE = 256 << 10  # files up to this size are read into the buffer, larger ones sendfile()d
_COPY_CHUNK = 1 << 30
# A consumed archive (apply's ``consume``) loses each member's data this often while it is copied,
# so that the archive and what it is extracted into never both hold a big file.
_CONSUME_STEP = 8 << 20
_MAX_PINNED = 256  # files whose read waits for the resume, each an open fd; the rest are copied frozen
_SPARSE_NAME = b"./GNUSparseFile.0/sparse"  # ustar name of sparse entries; the real one is in pax

_REG_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE})
_TYPE_KINDS = {
    **dict.fromkeys(_REG_TYPES, "file"),
    tarfile.LNKTYPE: "link",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
    tarfile.CHRTYPE: "chr",
    tarfile.BLKTYPE: "blk",
}


class LayerError(Exception):
    """A layer could not be captured or applied; the message is meant for the operator."""


class TooLarge(LayerError):
    """The captured content would exceed the caller's max_bytes; nothing was left at out_path."""


class LayerChanged(LayerError):
    """Files pinned to be read after the resume changed first (``inodes``: their st_dev and
    st_ino, for start_capture's copy_now)."""

    def __init__(self, message: str, inodes: list[tuple[int, int]]) -> None:
        super().__init__(message)
        self.inodes = inodes


# ---------------------------------------------------------------------------------------- mounts


def _unescape_mountinfo(field: bytes) -> bytes:
    """Undo the kernel's octal escaping (\\040 for a space, \\054 for a comma, ...) in mountinfo."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _overlay_options(rootfs: str, mountinfo: str) -> list[tuple[bytes, bytes]] | None:
    """(key, unescaped value) super options of the overlay mounted at `rootfs`, None if not one.

    The topmost mount at that path wins, as it is the one the container sees.
    """
    target = os.fsencode(os.path.realpath(rootfs))
    top: tuple[bytes, bytes] | None = None
    with open(mountinfo, "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b" ")
            try:
                sep = fields.index(b"-", 6)
            except ValueError:
                continue
            if len(fields) < sep + 2 or _unescape_mountinfo(fields[4]) != target:
                continue
            top = (fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else b"")
    if top is None or top[0] != b"overlay":
        return None
    options = []
    for option in top[1].split(b","):  # commas inside values are escaped as \054
        key, _, value = option.partition(b"=")
        options.append((key, _unescape_mountinfo(value)))
    return options


def upperdir_of(rootfs: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The overlay upperdir behind the mount at `rootfs`, or None if rootfs is not a writable overlay.

    None tells the caller that the bundle is a plain directory, to be captured whole with
    capture_tree.
    """
    for key, value in _overlay_options(rootfs, mountinfo) or ():
        if key == b"upperdir" and value:
            return os.fsdecode(value)
    return None


def _split_lowerdir(value: bytes) -> list[bytes]:
    """`/a\\:b:/c::/data` -> [/a:b, /c]: overlay's own backslash escaping; the layers after `::` are
    data-only (reachable through metacopy redirects alone), not part of the image's tree."""
    layers: list[bytes] = []
    for m in re.finditer(rb"(?s)((?:\\.|[^:\\])*)(:|\Z)", value):
        if not m.group(1):
            break  # `::` (or the end): no more visible layers
        layers.append(re.sub(rb"(?s)\\(.)", rb"\1", m.group(1)))
    return layers


def lowerdirs_of(rootfs: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The image layers of the overlay mounted at `rootfs`, topmost first ([] if it is no overlay).

    revert_diff looks the image up there. Both the legacy `lowerdir=a:b` option (shown as given,
    `\\:` escapes included) and the new mount API's repeated `lowerdir+=` are understood.
    """
    layers: list[bytes] = []
    for key, value in _overlay_options(rootfs, mountinfo) or ():
        if key == b"lowerdir":
            layers += _split_lowerdir(value)
        elif key == b"lowerdir+":
            layers.append(value)
    return [os.fsdecode(layer) for layer in layers]


# --------------------------------------------------------------------------------------- capture


def _keep_xattr(name: str) -> bool:
    """Xattrs that belong to the file rather than to the overlay or the host's trust store."""
    if name.startswith("user."):
        return not name.startswith("user.overlay.")
    return name.startswith("security.") or name in _ACL_XATTRS


def _read_xattrs(target: int | str, follow: bool = True) -> dict[str, bytes]:
    """All xattrs of an fd or (with follow=False) a path, overlay-private ones included."""
    try:
        names = os.listxattr(target) if follow else os.listxattr(target, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        try:
            out[name] = (
                os.getxattr(target, name) if follow else os.getxattr(target, name, follow_symlinks=False)
            )
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed meanwhile
                raise
    return out


def _overlay_flag(xattrs: dict[str, bytes], flag: str) -> bytes | None:
    return xattrs.get("trusted.overlay." + flag, xattrs.get("user.overlay." + flag))


def _octal(value: int, width: int) -> bytes:
    """A NUL-terminated octal ustar field, or GNU base-256 when it does not fit (sizes >= 8 GiB)."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    if value < 0 or value >= 256 ** (width - 1):
        raise LayerError(f"value {value} does not fit a tar header field")
    return b"\x80" + value.to_bytes(width - 1, "big")


def _pax_record(key: bytes, value: bytes) -> bytes:
    """One `<len> key=value\\n` record, whose length counts its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _pax_time(ns: int) -> bytes:
    sec, frac = divmod(abs(ns), 10**9)
    return b"%s%d.%09d" % (b"-" if ns < 0 else b"", sec, frac)


def _needs_pax_name(name: bytes) -> bool:
    return len(name) > 100 or not name.isascii()


def _header(
    name: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime_ns: int,
    linkname: bytes = b"",
    rdev: int = 0,
    xattrs: dict[str, bytes] | None = None,
    pax_first: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """The pax extended header (if any is needed) plus the ustar header of one entry."""
    records = list(pax_first or [])
    if _needs_pax_name(name):
        records.append((b"path", name))
    if _needs_pax_name(linkname):
        records.append((b"linkpath", linkname))
    ids = []
    for key, value in ((b"uid", uid), (b"gid", gid)):
        if not 0 <= value < 8**7:
            records.append((key, str(value).encode()))
            value = 0
        ids.append(value)
    sec = mtime_ns // 10**9
    if mtime_ns % 10**9 or not 0 <= sec < 8**11:
        records.append((b"mtime", _pax_time(mtime_ns)))
        sec = min(max(sec, 0), 8**11 - 1)
    for key, value in sorted((xattrs or {}).items()):
        records.append((os.fsencode(XATTR_PAX_PREFIX + key), value))

    out = b""
    if records:
        binary = any(k in (b"path", b"linkpath") and not _is_utf8(v) for k, v in records)
        data = (_pax_record(b"hdrcharset", b"BINARY") if binary else b"") + b"".join(
            _pax_record(k, v) for k, v in records
        )
        out = _ustar(b"././@PaxHeader", b"x", 0o644, 0, 0, len(data), 0, b"", 0) + _pad(data)
    return out + _ustar(name[:100], typeflag, mode, ids[0], ids[1], size, sec, linkname[:100], rdev)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def _ustar(
    name: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes,
    rdev: int,
) -> bytes:
    """A 512-byte POSIX ustar header block with its checksum."""
    major, minor = (os.major(rdev), os.minor(rdev)) if typeflag in (b"3", b"4") else (0, 0)
    head = b"".join(
        (
            name.ljust(100, b"\0"),
            _octal(mode & 0o7777, 8),
            _octal(uid, 8),
            _octal(gid, 8),
            _octal(size, 12),
            _octal(mtime, 12),
            b" " * 8,  # checksum, computed over the header with this field as spaces
            typeflag,
            linkname.ljust(100, b"\0"),
            b"ustar\x0000",
            b"\0" * 64,  # uname, gname
            _octal(major, 8),
            _octal(minor, 8),
            b"\0" * 167,  # prefix, padding
        )
    )
    checksum = b"%06o\0 " % sum(head)
    return head[:148] + checksum + head[156:]


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data regions of a file, found with SEEK_DATA/SEEK_HOLE."""
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here on
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                return [(0, size)]
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end - start))
        pos = end
    return extents


@dataclass
class _Pinned:
    """A big file whose data goes into the tar after the container runs again (start_capture)."""

    fd: int  # a dup: the inode seen frozen, whatever is later renamed over its path
    seen: tuple[int, int, int]  # size, mtime, ctime when frozen: the data is unchanged while equal
    what: str
    inode: tuple[int, int]  # st_dev, st_ino: start_capture's copy_now names it


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def identity_key(st: os.stat_result) -> str:
    """A cold file's data, named by its inode and times: while the key stays the same on this
    boot, so does the data (any write moves the ctime, see _TarWriter.cold)."""
    return ":".join(map(str, (st.st_dev, st.st_ino, *_identity(st))))


class _TarWriter:
    """Streams a tar into a temporary file (beside out_path, or in tmp_dir on the same file
    system), renamed into place only when complete.

    With cold_after, the data of big files unchanged for that many seconds (cold) is left as a
    hole if ``pin``, noted in ``holes`` for the tar's reader to read once the container runs
    again (Capture.extents): the freeze then costs metadata and small files, not the size of
    the layer. With align too, every cold file of at least ``align`` bytes is noted in
    stats["aligned"] (identity_key: [index of its first chunk, number of whole chunks]), and the
    whole chunks of one whose key is in ``unchanged`` (the previous checkpoint holds them) are
    left as a hole that nothing fills: ``reused`` tells the caller where they are.
    """

    def __init__(
        self,
        out_path: str,
        max_bytes: int | None,
        cold_after: float | None = None,
        tmp_dir: str | None = None,
        align: int | None = None,
        pin: bool = True,
        unchanged: Collection[str] = (),
        copy_now: Collection[tuple[int, int]] = (),
    ) -> None:
        self.out_path = out_path
        self.max_bytes = max_bytes
        self.align = align
        self.padding = 0  # bytes of alignment headers: not the layer's, so not held against max_bytes
        directory, base = os.path.split(os.path.abspath(out_path))
        self.fd, self.tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".partial", dir=tmp_dir or directory)
        self.buf = bytearray()
        self.size = 0  # bytes written or buffered
        self.stats: dict = {"files": 0, "bytes": 0, "deletions": 0, "skipped": 0, "copied_later": 0}
        self.stats.update(reused=0, aligned={}, align=align)
        self.cold_before = None if cold_after is None else time.time_ns() - int(cold_after * 1e9)
        self.pin_cold = pin
        self.unchanged = unchanged
        self.copy_now = copy_now
        self.reused: dict[str, int] = {}  # identity_key -> index of the first chunk left as a hole
        self.pinned: list[_Pinned] = []
        self.holes: list[tuple[int, _Pinned, int, int]] = []  # tar offset, file, offset, count

    def cold(self, st: os.stat_result) -> bool:
        """Its ctime (which any write moves, and which no one can set back) older than cold_after.
        A write through a shared mapping moves it only at the first write after each writeback,
        which the age covers."""
        return self.cold_before is not None and st.st_ctime_ns <= self.cold_before

    def pin(self, fd: int, st: os.stat_result, what: str, count: int) -> _Pinned | None:
        """The file (fd, st its fstat), pinned for a later read, if its ``count`` bytes still to copy
        may wait: over 256 KiB, and the file cold. check() refuses any change of the inode meanwhile,
        even one that keeps the data (a chmod, a rename over it): the capture fails, the next one
        copies the file frozen (it is new). Nor is a file in ``copy_now``."""
        if not self.pin_cold or len(self.pinned) >= _MAX_PINNED or count <= _SMALL_FILE or not self.cold(st):
            return None
        inode = (st.st_dev, st.st_ino)
        if inode in self.copy_now:
            return None
        pinned = _Pinned(os.dup(fd), _identity(st), what, inode)
        self.pinned.append(pinned)
        return pinned

    def reserve(self, nbytes: int, what: str) -> None:
        """Refuse, before writing it, an entry that would take the tar (and its trailer) past max."""
        if self.max_bytes is not None and self.size - self.padding + nbytes + 2 * BLOCK > self.max_bytes:
            raise TooLarge(
                f"capture to {self.out_path} exceeds the limit of {self.max_bytes} bytes "
                f"(at {what!r}, {self.size} bytes so far)"
            )

    def put_header(self, head: bytes, size: int) -> None:
        """Put an entry's header (from _header); for a file of ``size`` bytes, ``align`` or more,
        with a pax comment sized so that its data starts at a multiple of ``align``. The store cuts
        files at multiples of its chunk size, so the file then makes the same chunks whatever
        precedes it in the tar: a staged input no longer makes new chunks (a new upload of all of
        it) at every checkpoint because a log before it grew. The comment's value is a hole: no
        write, nothing in memory. The entry's own pax records, if any, go into the same pax header
        (Python's tarfile keeps only the last of two).
        """
        if self.align is None or size < self.align:
            self.put(head)
            return
        records = head[BLOCK : BLOCK + int(head[124:135], 8)] if len(head) > BLOCK else b""
        least = -(len(records) + 32) % BLOCK + len(records) + 32  # room for a comment record
        data = least + -(self.size + 2 * BLOCK + least) % self.align  # the pax data, whole blocks
        record = data - len(records)
        prefix = b"%d comment=" % record
        self.put(_ustar(b"././@PaxHeader", b"x", 0o644, 0, 0, data, 0, b"", 0) + records + prefix)
        self.skip(record - len(prefix) - 1)
        self.put(b"\n" + head[-BLOCK:])
        self.padding += 2 * BLOCK + data - len(head)

    def skip_unchanged(self, st: os.stat_result) -> int:
        """Bytes of a file's data, from its start (the tar's end, just after its header), left as
        a hole because the previous checkpoint holds them: the whole chunks of a cold file whose
        identity_key the caller named unchanged. Notes every cold aligned file for the next."""
        if self.align is None or st.st_size < self.align or not self.cold(st):
            return 0
        key, index = identity_key(st), self.size // self.align
        self.stats["aligned"][key] = [index, st.st_size // self.align]
        if key not in self.unchanged:
            return 0
        whole = st.st_size // self.align * self.align
        self.skip(whole)
        self.reused[key] = index
        self.stats["reused"] += whole
        return whole

    def skip(self, nbytes: int) -> None:
        """Leave the next nbytes of the tar as a hole (never its last bytes: the trailer follows)."""
        self.flush()
        os.lseek(self.fd, nbytes, os.SEEK_CUR)
        self.size += nbytes

    def put(self, data: bytes) -> None:
        self.buf += data
        self.size += len(data)
        if len(self.buf) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        done = 0
        while done < len(self.buf):  # a regular file takes it all at once; the loop is for form
            done += os.write(self.fd, self.buf[done:] if done else self.buf)
        self.buf.clear()

    def send(self, src: int, offset: int, count: int, what: str, pinned: _Pinned | None = None) -> None:
        """Copy count bytes of src from offset straight into the tar (of a pinned file: later)."""
        if pinned is not None and count > _SMALL_FILE:
            self.holes.append((self.size, pinned, offset, count))
            self.skip(count)
            self.stats["copied_later"] += count
            return
        shrank = f"{what!r} shrank while it was being captured (is the container frozen?)"
        if count <= _SMALL_FILE:
            data = os.pread(src, count, offset)
            if len(data) != count:
                raise LayerError(shrank)
            self.put(data)
            return
        self.flush()
        _copy(src, offset, self.fd, self.size, count, shrank)
        self.size += count

    def seal(self) -> None:
        self.put(b"\0" * (2 * BLOCK))
        self.flush()

    def check(self) -> None:
        """Refuse the capture if a pinned file changed since frozen."""
        changed = [pinned for pinned in self.pinned if _identity(os.fstat(pinned.fd)) != pinned.seen]
        if changed:
            raise LayerChanged(
                f"{changed[0].what!r} changed after the container was resumed, before its data was read; "
                "the capture no longer matches the frozen memory",
                [pinned.inode for pinned in changed],
            )

    def publish(self) -> None:
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.out_path)

    def abort(self) -> None:
        for pinned in self.pinned:
            os.close(pinned.fd)
        self.pinned.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class _Capture:
    """Walks a directory by fds (never following symlinks) and writes each entry to a _TarWriter."""

    def __init__(self, writer: _TarWriter, diff: bool, dev: int) -> None:
        self.w = writer
        self.diff = diff  # interpret overlay whiteouts/opaque dirs
        self.dev = dev
        self.links: dict[tuple[int, int], bytes] = {}

    def entry(
        self,
        name: bytes,
        typeflag: bytes,
        st: os.stat_result,
        xattrs: dict[str, bytes],
        linkname: bytes = b"",
        size: int = 0,
    ) -> None:
        kept = {k: v for k, v in xattrs.items() if _keep_xattr(k)}
        head = _header(
            name, typeflag, st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, linkname, st.st_rdev, kept
        )
        self.w.reserve(len(head) + size + (-size % BLOCK), os.fsdecode(name))
        self.w.put_header(head, size)
        self.w.stats["files"] += 1

    def deletion(self, name: bytes, st: os.stat_result) -> None:
        head = _header(name, b"0", 0, 0, 0, 0, max(st.st_mtime_ns // 10**9, 0) * 10**9)
        self.w.reserve(len(head), os.fsdecode(name))
        self.w.put(head)
        self.w.stats["deletions"] += 1

    def check_overlay(self, xattrs: dict[str, bytes], name: bytes) -> None:
        for flag in ("metacopy", "redirect"):
            if _overlay_flag(xattrs, flag) is not None:
                raise LayerError(
                    f"{os.fsdecode(name)!r} in the upperdir carries overlay {flag} data, which lives in the "
                    f"lower layers and cannot be carried as a diff; mount the overlay with "
                    f"metacopy=off,redirect_dir=off (Docker's default)"
                )

    def walk_dir(self, dfd: int, rel: bytes, st: os.stat_result) -> None:
        xattrs = _read_xattrs(dfd)
        if self.diff:
            self.check_overlay(xattrs, rel or b".")
        self.entry((rel or b".") + b"/", b"5", st, xattrs)
        prefix = rel + b"/" if rel else b""
        if self.diff and _overlay_flag(xattrs, "opaque") == b"y":
            self.deletion(prefix + OPAQUE_MARKER.encode(), st)
        if rel and st.st_dev != self.dev:
            return  # a mount point: record it, do not descend (like tar --one-file-system)
        for name in sorted(os.listdir(dfd)):
            self.walk_child(dfd, name, prefix + os.fsencode(name))

    def walk_child(self, dfd: int, name: str, rel: bytes) -> None:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        mode = st.st_mode
        if self.diff:
            if stat.S_ISCHR(mode) and st.st_rdev == 0:  # an overlay whiteout
                self.deletion(_whiteout_name(rel), st)
                return
            if name.startswith(WHITEOUT_PREFIX):
                raise LayerError(
                    f"{os.fsdecode(rel)!r}: a real file whose name starts with {WHITEOUT_PREFIX!r} cannot be "
                    "represented in an OCI-style diff"
                )
        if stat.S_ISDIR(mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                self.walk_dir(fd, rel, st)
            finally:
                os.close(fd)
            return
        if stat.S_ISSOCK(mode) or not (
            stat.S_ISREG(mode)
            or stat.S_ISLNK(mode)
            or stat.S_ISFIFO(mode)
            or stat.S_ISCHR(mode)
            or stat.S_ISBLK(mode)
        ):
            self.w.stats["skipped"] += 1
            return
        if stat.S_ISREG(mode):
            fd = _open_nofollow_read(dfd, name)
            try:
                xattrs = _read_xattrs(fd)
                if self.diff:
                    self.check_overlay(xattrs, rel)
                    if st.st_size == 0 and _overlay_flag(xattrs, "whiteout") is not None:  # an xwhiteout
                        self.deletion(_whiteout_name(rel), st)
                        return
                if self.hardlink(rel, st, xattrs):
                    return
                self.regular(fd, rel, xattrs)
            finally:
                os.close(fd)
            return
        proc = f"/proc/self/fd/{dfd}/{name}"
        xattrs = _read_xattrs(proc, follow=False)
        if self.hardlink(rel, st, xattrs):
            return
        if stat.S_ISLNK(mode):
            self.entry(rel, b"2", st, xattrs, linkname=os.fsencode(os.readlink(name, dir_fd=dfd)))
        elif stat.S_ISFIFO(mode):
            self.entry(rel, b"6", st, xattrs)
        else:
            self.entry(rel, b"3" if stat.S_ISCHR(mode) else b"4", st, xattrs)

    def hardlink(self, rel: bytes, st: os.stat_result, xattrs: dict[str, bytes]) -> bool:
        """Write a link entry if this inode was already stored under another name."""
        if st.st_nlink < 2:
            return False
        key = (st.st_dev, st.st_ino)
        first = self.links.get(key)
        if first is None:
            self.links[key] = rel
            return False
        self.entry(rel, b"1", st, xattrs, linkname=first)
        return True

    def regular(self, fd: int, rel: bytes, xattrs: dict[str, bytes]) -> None:
        st = os.fstat(fd)  # the identity of what is read, whatever the name now points to
        size = st.st_size
        what = os.fsdecode(rel)
        extents = _data_extents(fd, size) if st.st_blocks * 512 < size else [(0, size)]
        if sum(n for _, n in extents) == size:
            self.entry(rel, b"0", st, xattrs, size=size)
            if size:
                known = self.w.skip_unchanged(st)
                self.w.send(fd, known, size - known, what, self.w.pin(fd, st, what, size - known))
                self.w.put(b"\0" * (-size % BLOCK))
            self.w.stats["bytes"] += size
            return
        # GNU tar sizes the file from the last map entry: end a trailing hole with an empty one.
        entries = [*extents, (size, 0)] if not extents or sum(extents[-1]) < size else extents
        sparse_map = _pad(b"".join([b"%d\n" % len(entries)] + [b"%d\n%d\n" % e for e in entries]))
        data = sum(n for _, n in extents)
        stored = len(sparse_map) + data
        pax = [
            (b"GNU.sparse.major", b"1"),
            (b"GNU.sparse.minor", b"0"),
            (b"GNU.sparse.name", rel),
            (b"GNU.sparse.realsize", b"%d" % size),
        ]
        kept = {k: v for k, v in xattrs.items() if _keep_xattr(k)}
        head = _header(
            _SPARSE_NAME,
            b"0",
            st.st_mode,
            st.st_uid,
            st.st_gid,
            stored,
            st.st_mtime_ns,
            xattrs=kept,
            pax_first=pax,
        )
        self.w.reserve(len(head) + stored + (-stored % BLOCK), what)
        self.w.put(head + sparse_map)
        pinned = self.w.pin(fd, st, what, data)
        for offset, length in extents:
            self.w.send(fd, offset, length, what, pinned)
        self.w.put(b"\0" * (-stored % BLOCK))
        self.w.stats["files"] += 1
        self.w.stats["bytes"] += data


def _whiteout_name(rel: bytes) -> bytes:
    """`dir/name` -> `dir/.wh.name`."""
    parent, _, base = rel.rpartition(b"/")
    return (parent + b"/" if parent else b"") + WHITEOUT_PREFIX.encode() + base


def _open_nofollow_read(dfd: int, name: str) -> int:
    """Open for reading without following a symlink or (when allowed) touching atime."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(name, flags | os.O_NOATIME, dir_fd=dfd)
    except PermissionError:
        return os.open(name, flags, dir_fd=dfd)


class Capture:
    """A capture taken while the container was frozen. The data of its pinned files is not in
    the tar: holes there, read by whoever reads the tar from ``extents`` (the store's Borrowed),
    then check()ed. So a job's staged inputs never need a second copy's room on disk."""

    def __init__(self, writer: _TarWriter, path: str) -> None:
        self._w = writer
        self._path = path
        self.reused = writer.reused  # identity_key -> tar chunk index: holes the previous chunks fill
        self.extents = [(at, pinned.fd, offset, count) for at, pinned, offset, count in writer.holes]

    def publish(self) -> dict:
        """Put the tar, holes and all, at out_path (once the container runs again: a reader of
        the tar reads the pinned files). Returns the stats capture_diff describes."""
        try:
            self._w.publish()
        except OSError as e:
            self._w.abort()
            raise LayerError(f"cannot capture {self._path} into {self._w.out_path}: {e}") from e
        self._w.stats["tar_bytes"] = self._w.size
        return self._w.stats

    def check(self) -> None:
        """LayerChanged if a pinned file changed since frozen: what was read from ``extents``
        may then not be what the frozen memory saw. Call it after the last read."""
        self._w.check()

    def close(self) -> None:
        """No temporary file (a tar not yet published) and no pinned file left open."""
        self._w.abort()


def start_capture(
    path: str,
    out_path: str,
    max_bytes: int | None,
    *,
    diff: bool,
    cold_after: float | None,
    tmp_dir: str | None = None,
    align: int | None = None,
    pin: bool = True,
    unchanged: Collection[str] = (),
    copy_now: Collection[tuple[int, int]] = (),
) -> Capture:
    """Capture like capture_diff (diff) or capture_tree, except the data of files over 256 KiB
    whose ctime is older than cold_after seconds (if ``pin``): those are pinned open and their
    data left out (Capture.extents), to be read once the container runs again and then
    checked not to have changed (Capture.check). tmp_dir (on out_path's file system) keeps
    the unfinished tar away from out_path's directory. With align (the store's chunk
    size), the data of every file of at least that size starts at a multiple of it in the tar;
    whole chunks of cold files named ``unchanged`` are not copied (Capture.reused, _TarWriter).
    Files in ``copy_now`` (st_dev, st_ino), seen changing while pinned, are copied frozen."""
    try:
        writer = _TarWriter(out_path, max_bytes, cold_after, tmp_dir, align, pin, unchanged, copy_now)
    except OSError as e:
        raise LayerError(f"cannot create {out_path}: {e}") from e
    try:
        rootfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(rootfd)
            _Capture(writer, diff, st.st_dev).walk_dir(rootfd, b"", st)
        finally:
            os.close(rootfd)
        writer.seal()
    except BaseException as e:
        writer.abort()
        if isinstance(e, OSError):
            raise LayerError(f"cannot capture {path} into {out_path}: {e}") from e
        if isinstance(e, RecursionError):
            raise LayerError(f"cannot capture {path}: directory tree too deep") from e
        raise
    return Capture(writer, path)


def capture_diff(upperdir: str, out_path: str, max_bytes: int | None = None) -> dict:
    """Tar the overlay writable layer at `upperdir`, deletions included, into out_path.

    Whiteouts become `.wh.<name>` entries and opaque directories a `.wh..wh..opq` marker, so that
    apply_diff onto a fresh copy of the image yields exactly the container's merged view. Returns
    {files, bytes, deletions, skipped, tar_bytes}: entries stored, file data bytes stored (holes
    excluded), deletion markers, sockets skipped, and the tar's size. max_bytes caps the tar's size;
    beyond it TooLarge is raised and out_path is not created.
    """
    return start_capture(upperdir, out_path, max_bytes, diff=True, cold_after=None).publish()


def capture_tree(path: str, out_path: str, max_bytes: int | None = None, align: int | None = None) -> dict:
    """Tar a whole directory (a /dev/shm tmpfs, a writable bind mount, a plain rootfs) into out_path.

    Same fidelity and TooLarge rule as capture_diff, but no overlay interpretation: a 0:0 character
    device is stored as a device. Mount points below `path` are recorded but not descended into.
    align: as start_capture's.
    """
    return start_capture(path, out_path, max_bytes, diff=False, cold_after=None, align=align).publish()


# ----------------------------------------------------------------------------------------- apply


@dataclass
class _Step:
    kind: str  # file, link, symlink, dir, fifo, chr, blk, whiteout, opaque
    parts: tuple[str, ...]  # path below the destination, component by component
    member: tarfile.TarInfo
    link: tuple[str, ...] = ()  # hard-link target


def _split(name: str, what: str) -> tuple[str, ...]:
    """Components of an archive path, refusing anything that could point outside the destination."""
    if "\0" in name:
        raise LayerError(f"refusing {what} {name!r}: NUL byte in path")
    if name.startswith("/"):
        raise LayerError(f"refusing {what} {name!r}: absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise LayerError(f"refusing {what} {name!r}: '..' component")
    return parts


def _plan(members: list[tarfile.TarInfo], diff: bool) -> list[_Step]:
    """Validate every member before anything is written; refuse the archive on the first bad one."""
    steps: list[_Step] = []
    stored: set[tuple[str, ...]] = set()
    for m in members:
        kind = _TYPE_KINDS.get(m.type)
        if kind is None:
            raise LayerError(f"refusing entry {m.name!r}: unsupported tar entry type {m.type!r}")
        parts = _split(m.name, "entry")
        if diff:
            for i, part in enumerate(parts):
                if not part.startswith(WHITEOUT_PREFIX):
                    continue
                if i != len(parts) - 1 or kind != "file":
                    raise LayerError(f"refusing entry {m.name!r}: misplaced whiteout name")
                if part == OPAQUE_MARKER:
                    steps.append(_Step("opaque", parts[:-1], m))
                elif not part.startswith(WHITEOUT_PREFIX * 2):  # .wh..wh.* is aufs bookkeeping: ignored
                    target = part[len(WHITEOUT_PREFIX) :]
                    if target in ("", ".", ".."):
                        raise LayerError(f"refusing whiteout {m.name!r}: it names no file")
                    steps.append(_Step("whiteout", (*parts[:-1], target), m))
                kind = ""
            if not kind:
                continue
        if not parts and kind != "dir":
            raise LayerError(f"refusing entry {m.name!r}: the archive root must be a directory")
        link: tuple[str, ...] = ()
        if kind == "link":
            link = _split(m.linkname, f"hard link {m.name!r} ->")
            if link not in stored or link == parts:
                raise LayerError(
                    f"refusing hard link {m.name!r} -> {m.linkname!r}: the target is not an earlier entry"
                    " of this archive"
                )
        if kind == "dir":
            stored.discard(parts)
        else:
            stored.add(parts)
        steps.append(_Step(kind, parts, m, link))
    return steps


def _pax_ns(text: str) -> int:
    """Nanoseconds from a pax time such as `1700000000.123456789` or `-1.5`."""
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("+-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise ValueError(text)
    return sign * (int(whole) * 10**9 + int((frac + "0" * 9)[:9]))


def _mtime_ns(m: tarfile.TarInfo) -> int:
    raw = m.pax_headers.get("mtime")
    if raw:
        try:
            return _pax_ns(raw)
        except ValueError:
            pass
    return int(m.mtime) * 10**9


def _member_xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    return {
        key[len(XATTR_PAX_PREFIX) :]: value.encode("utf-8", "surrogateescape")
        for key, value in m.pax_headers.items()
        if key.startswith(XATTR_PAX_PREFIX) and _keep_xattr(key[len(XATTR_PAX_PREFIX) :])
    }


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(rootfd: int, parts: tuple[str, ...], create: bool) -> int | None:
    """A new fd for the directory `parts` below rootfd, walked without following any symlink.

    Missing components are created (mode 0755) when `create`; otherwise, and for a component that
    is a symlink or not a directory, None is returned.
    """
    fd = os.dup(rootfd)
    try:
        for part in parts:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    return None
                raise
            os.close(fd)
            fd = nfd
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def _remove(dfd: int, name: str) -> bool:
    """Remove `name` in dfd, a directory recursively, without following symlinks."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)
    return True


_NOT_HERE = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)  # a call this file system lacks


def _copy(
    src: int, src_off: int, dst: int, dst_off: int, count: int, short: str = "the archive is truncated"
) -> None:
    """Copy count bytes from src@src_off to dst@dst_off (leaving dst's offset after them), in
    the kernel. copy_file_range first: within a file system that can (XFS made with reflink, as
    mkfs.xfs does by default since xfsprogs 5.1; btrfs) it shares the blocks rather than copying
    them, so a big file costs neither time nor room, while frozen or laid onto a new rootfs (a
    big file's data starts at a multiple of the chunk size in our tars, which sharing needs).
    Elsewhere the kernel copies the data, as sendfile does."""
    os.lseek(dst, dst_off, os.SEEK_SET)
    while count > 0:
        n = _copy_step(src, src_off, dst, min(count, _COPY_CHUNK))
        if n == 0:
            raise LayerError(short)
        src_off += n
        count -= n


def _copy_step(src: int, src_off: int, dst: int, count: int) -> int:
    """Up to count bytes of src from src_off to dst's offset, by the first call that works here."""
    try:
        n = os.copy_file_range(src, dst, count, src_off)
        if n:
            return n  # 0: the end, or a file it only pretends to read (procfs before Linux 5.19)
    except OSError as e:
        if e.errno not in _NOT_HERE:
            raise
    try:
        return os.sendfile(dst, src, src_off, count)
    except OSError as e:
        if e.errno not in _NOT_HERE:
            raise
    data = os.pread(src, min(count, _FLUSH_AT), src_off)
    return len(data) and os.write(dst, data)


class _Applier:
    """Applies validated steps under rootfd, one O_NOFOLLOW walk per parent directory."""

    def __init__(self, rootfd: int, rawfd: int, dest: str, consume: bool) -> None:
        self.rootfd = rootfd
        self.rawfd = rawfd
        self.dest = dest
        self.consume = consume
        self.cached: tuple[tuple[str, ...], int] | None = None
        self.dir_times: list[tuple[tuple[str, ...], int]] = []
        self.stats = {"files": 0, "bytes": 0, "deletions": 0, "xattrs_skipped": 0}

    def close(self) -> None:
        if self.cached:
            os.close(self.cached[1])
            self.cached = None

    def parent(self, parts: tuple[str, ...], name: str) -> int:
        """The (cached) fd of directory `parts`, created if missing; refuse if it is a symlink."""
        if self.cached and self.cached[0] == parts:
            return self.cached[1]
        self.close()  # so the cache is always this entry's parent, which no removal can affect
        if not parts:
            return self.rootfd
        fd = _open_dir(self.rootfd, parts, create=True)
        if fd is None:
            raise LayerError(
                f"refusing entry {name!r}: a parent directory in {self.dest} is a symlink or not a "
                "directory (it would be written outside the destination or through a link)"
            )
        self.cached = (parts, fd)
        return fd

    def clear(self, parts: tuple[str, ...]) -> None:
        """Remove the contents of a directory that exists (and is no symlink) under the root."""
        fd = _open_dir(self.rootfd, parts, create=False)
        if fd is None:
            return
        try:
            for name in os.listdir(fd):
                _remove(fd, name)
        finally:
            os.close(fd)

    def delete(self, step: _Step) -> None:
        if step.kind == "opaque":
            self.clear(step.parts)
        else:
            fd = _open_dir(self.rootfd, step.parts[:-1], create=False)
            if fd is not None:
                try:
                    _remove(fd, step.parts[-1])
                finally:
                    os.close(fd)
        self.stats["deletions"] += 1

    def set_xattrs(self, target: int | str, m: tarfile.TarInfo) -> None:
        for key, value in _member_xattrs(m).items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                self.stats["xattrs_skipped"] += 1  # the destination filesystem cannot hold it

    def fd_meta(self, fd: int, m: tarfile.TarInfo) -> None:
        """Owner, then mode (chown clears setuid), then xattrs (chown clears file caps)."""
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)
        self.set_xattrs(fd, m)

    def apply(self, step: _Step) -> None:
        m, parts = step.member, step.parts
        if not parts:  # the archive root: the destination directory itself
            self.fd_meta(self.rootfd, m)
            self.dir_times.append((parts, _mtime_ns(m)))
            self.stats["files"] += 1
            return
        pfd = self.parent(parts[:-1], m.name)
        leaf = parts[-1]
        try:
            old = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        mtime = _mtime_ns(m)
        if step.kind == "dir":
            if old is not None and not stat.S_ISDIR(old.st_mode):
                os.unlink(leaf, dir_fd=pfd)
                old = None
            if old is None:
                os.mkdir(leaf, 0o700, dir_fd=pfd)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
            try:
                self.fd_meta(fd, m)
            finally:
                os.close(fd)
            self.dir_times.append((parts, mtime))  # set last: writing children changes it
        else:
            if old is not None:  # replace, never write through: it may be a link or a symlink
                _remove(pfd, leaf)
            if step.kind == "file":
                fd = os.open(
                    leaf,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=pfd,
                )
                try:
                    self.stats["bytes"] += self.write_data(fd, m)
                    self.fd_meta(fd, m)
                    os.utime(fd, ns=(mtime, mtime))
                finally:
                    os.close(fd)
            elif step.kind == "link":
                tfd = _open_dir(self.rootfd, step.link[:-1], create=False)
                if tfd is None:
                    raise LayerError(f"refusing hard link {m.name!r}: its target's directory is gone")
                try:
                    os.link(step.link[-1], leaf, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
                finally:
                    os.close(tfd)
            else:
                self.special(pfd, leaf, step.kind, m, mtime)
        self.stats["files"] += 1

    def special(self, pfd: int, leaf: str, kind: str, m: tarfile.TarInfo, mtime: int) -> None:
        """Symlinks, fifos and device nodes: metadata set by name, never following the leaf."""
        if kind == "symlink":
            os.symlink(m.linkname, leaf, dir_fd=pfd)
        elif kind == "fifo":
            os.mkfifo(leaf, 0o600, dir_fd=pfd)
        else:
            kind_bit = stat.S_IFCHR if kind == "chr" else stat.S_IFBLK
            os.mknod(leaf, kind_bit | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
        os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if kind != "symlink":
            os.chmod(leaf, m.mode & 0o7777, dir_fd=pfd, follow_symlinks=False)
        self.set_xattrs(f"/proc/self/fd/{pfd}/{leaf}", m)
        os.utime(leaf, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)

    def write_data(self, fd: int, m: tarfile.TarInfo) -> int:
        """Copy a member's data from the raw archive; sparse members get their holes back."""
        if m.sparse is None:
            self.copy(m.offset_data, fd, 0, m.size, m.offset_data)
            return m.size
        pos = m.offset_data
        for offset, length in m.sparse:
            if length:
                self.copy(pos, fd, offset, length, m.offset_data)
            pos += length
        os.ftruncate(fd, m.size)
        return pos - m.offset_data

    def copy(self, src_off: int, dst: int, dst_off: int, count: int, start: int) -> None:
        """_copy from the archive; consuming it, punch out all of the member copied so far (from
        ``start``) after each step: one range, so no block between two steps stays allocated."""
        if not self.consume:
            _copy(self.rawfd, src_off, dst, dst_off, count)
            return
        while count > 0:
            n = min(count, _CONSUME_STEP)
            _copy(self.rawfd, src_off, dst, dst_off, n)
            src_off, dst_off, count = src_off + n, dst_off + n, count - n
            libc.punch_hole(self.rawfd, start, src_off - start)

    def set_dir_times(self) -> None:
        for parts, mtime in reversed(self.dir_times):  # deepest first; utime leaves the parent alone
            fd = _open_dir(self.rootfd, parts, create=False)
            if fd is None:
                continue  # replaced by a later entry
            try:
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)


def _read_plan(tar_path: str, diff: bool) -> list[_Step]:
    """The archive's validated steps; LayerError for an unreadable or hostile archive."""
    try:
        with tarfile.open(tar_path, "r:", encoding="utf-8", errors="surrogateescape") as tf:
            members = tf.getmembers()
    except (tarfile.TarError, OSError, ValueError, EOFError, OverflowError) as e:
        raise LayerError(f"cannot read layer archive {tar_path}: {e}") from e
    try:
        return _plan(members, diff)
    except LayerError as e:
        raise LayerError(f"{tar_path}: {e}") from e


def _apply(tar_path: str, dest: str, diff: bool, clear: bool, consume: bool) -> dict:
    steps = _read_plan(tar_path, diff)
    rawfd = os.open(tar_path, (os.O_RDWR if consume else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        rootfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        os.close(rawfd)
        raise LayerError(f"cannot open destination {dest}: {e}") from e
    applier = _Applier(rootfd, rawfd, dest, consume)
    step = None
    try:
        if clear:
            applier.clear(())
        for step in steps:  # deletions first: they only ever concern what was there before
            if step.kind in ("whiteout", "opaque"):
                applier.delete(step)
        for step in steps:
            if step.kind not in ("whiteout", "opaque"):
                applier.apply(step)
        step = None
        applier.set_dir_times()
    except OSError as e:
        where = f" at {step.member.name!r}" if step else ""
        raise LayerError(f"cannot apply {tar_path} to {dest}{where}: {e}") from e
    except LayerError as e:
        raise LayerError(f"{tar_path} -> {dest}: {e}") from e
    finally:
        applier.close()
        os.close(rootfd)
        os.close(rawfd)
    return applier.stats


def apply_diff(tar_path: str, rootfs: str, consume: bool = False) -> dict:
    """Lay a capture_diff archive onto a rootfs directory (a fresh copy of the same image).

    Deletions go first (a whiteout removes the path, an opaque marker empties the directory), then
    entries with their owners, modes, xattrs and mtimes; an existing non-directory is replaced,
    never written through. Hostile archives are refused with LayerError before anything is
    written where the paths themselves are bad, and at the entry that would pass through a symlink
    otherwise. ``consume``: the archive is scratch, its data is punched out as it is copied (a
    restore then needs room for the layer once, not twice); its headers stay, for revert_diff.
    Returns {files, bytes, deletions, xattrs_skipped}.
    """
    return _apply(tar_path, rootfs, diff=True, clear=False, consume=consume)


def apply_tree(tar_path: str, dest: str, clear: bool = False, consume: bool = False) -> dict:
    """Refill a directory (the new /dev/shm, a bind-mount source) from a capture_tree archive.

    Same safety rules as apply_diff; `.wh.` names are plain files here. Existing entries not in
    the archive are kept unless clear=True, which empties dest first (a host directory may hold
    data that is not ours to delete). ``consume`` as for apply_diff.
    """
    return _apply(tar_path, dest, diff=False, clear=clear, consume=consume)


# ---------------------------------------------------------------------------------------- revert

_Layers = list[tuple[str, os.stat_result]]  # one image path in the lower layers, topmost first
_Parts = tuple[str, ...]


def _kept_xattrs(target: int | str) -> dict[str, bytes]:
    """The xattrs an archive would carry, of an fd or of a path (never followed)."""
    return {k: v for k, v in _read_xattrs(target, follow=isinstance(target, int)).items() if _keep_xattr(k)}


def _sync_xattrs(target: int | str, want: dict[str, bytes]) -> None:
    """Give target (an fd, or a /proc/self/fd path to a possible symlink) exactly `want`.

    security.* names not in `want` stay: they are the host LSM's labels, not the container's.
    Names the filesystem cannot hold are skipped, as apply does.
    """
    follow = isinstance(target, int)
    have = _kept_xattrs(target)
    for key in sorted(want.keys() | {k for k in have if not k.startswith("security.")}):
        value = want.get(key)
        if have.get(key) == value:
            continue
        try:
            if value is None:
                os.removexattr(target, key, follow_symlinks=follow)
            else:
                os.setxattr(target, key, value, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise


def _is_whiteout(path: str, st: os.stat_result) -> bool:
    """An overlay whiteout in a layer: a 0:0 character device, or the kernel's xwhiteout (an empty
    file flagged overlay.whiteout)."""
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size == 0
        and _overlay_flag(_read_xattrs(path, follow=False), "whiteout") is not None
    )


def _image_child(layers: _Layers, name: str) -> _Layers:
    """`name` in the image directory made of `layers`, looked up as overlay does.

    [] if no layer has it or a whiteout hides it; the topmost entry alone if that is not a
    directory (it hides all below); otherwise the directories to merge, down to an opaque one or a
    layer whose whiteout or non-directory ends the merge.
    """
    found: _Layers = []
    for directory, _ in layers:
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if _is_whiteout(path, st):
            break
        if not stat.S_ISDIR(st.st_mode):
            return found or [(path, st)]
        found.append((path, st))
        if _overlay_flag(_read_xattrs(path, follow=False), "opaque") == b"y":
            break
    return found


def _image_lookup(lowerdirs: list[str], parts: _Parts) -> _Layers:
    """`parts` in the image, one component at a time, so that no symlink in a layer is followed."""
    layers: _Layers = [(d, os.stat(d)) for d in lowerdirs]
    for name in parts:
        if not layers or not stat.S_ISDIR(layers[0][1].st_mode):
            return []
        layers = _image_child(layers, name)
    return layers


class _Reverter:
    """Puts the image's version of paths back under rootfd, walking it as _Applier does."""

    def __init__(self, rootfd: int, lowerdirs: list[str]) -> None:
        self.rootfd = rootfd
        self.lowerdirs = lowerdirs
        self.links: dict[tuple[int, int], _Parts] = {}  # image inode -> first path restored from it
        self.dir_times: list[tuple[_Parts, os.stat_result]] = []
        self.stats = {"removed": 0, "restored": 0}

    def revert(self, parts: _Parts, full: bool) -> bool:
        """Make `parts` what the image has there; True when its whole subtree is now the image's.

        A directory in both keeps its contents, for the archive's paths below it come later and
        copying the rest would copy the image up for nothing, unless `full` (a whiteout or opaque
        marker emptied it): then it is replaced like any other entry.
        """
        image = _image_lookup(self.lowerdirs, parts)
        if not parts:  # the root can only be emptied, not replaced
            if full:
                for name in os.listdir(self.rootfd):
                    self.stats["removed"] += _remove(self.rootfd, name)
                self.fill(self.rootfd, parts, image)
            if image:
                self.reset_dir(self.rootfd, parts, image)
            return full
        pfd = _open_dir(self.rootfd, parts[:-1], create=False)
        if pfd is None:
            return True  # the parent was removed or is a symlink: the image has nothing here either
        try:
            leaf = parts[-1]
            try:
                cur = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                cur = None
            if image and cur and not full and stat.S_ISDIR(cur.st_mode) and stat.S_ISDIR(image[0][1].st_mode):
                fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
                try:
                    self.reset_dir(fd, parts, image)
                finally:
                    os.close(fd)
                return False
            if cur is not None:
                self.stats["removed"] += _remove(pfd, leaf)
            if image:
                self.restore(pfd, leaf, parts, image)
            return True
        finally:
            os.close(pfd)

    def reset_dir(self, fd: int, parts: _Parts, image: _Layers) -> None:
        """The image directory's owner, mode and xattrs now; its times once its children are done."""
        path, st = image[0]
        self.meta(fd, st, _kept_xattrs(path))
        self.dir_times.append((parts, st))
        self.stats["restored"] += 1

    @staticmethod
    def meta(fd: int, st: os.stat_result, xattrs: dict[str, bytes]) -> None:
        """Owner, then mode (chown clears setuid), then xattrs (chown clears file caps)."""
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        _sync_xattrs(fd, xattrs)

    def fill(self, fd: int, parts: _Parts, image: _Layers) -> None:
        """Restore every child of the image directory into the (empty) directory fd."""
        for name in sorted({name for directory, _ in image for name in os.listdir(directory)}):
            child = _image_child(image, name)
            if child:
                self.restore(fd, name, (*parts, name), child)

    def restore(self, pfd: int, leaf: str, parts: _Parts, image: _Layers) -> None:
        """Copy the image's entry, a directory with everything in it, to the free name leaf in pfd."""
        path, st = image[0]
        mode, times = st.st_mode, (st.st_atime_ns, st.st_mtime_ns)
        if stat.S_ISSOCK(mode):
            return  # as in capture: whoever serves it binds it again
        self.stats["restored"] += 1
        if stat.S_ISDIR(mode):
            os.mkdir(leaf, 0o700, dir_fd=pfd)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
            try:
                self.fill(fd, parts, image)
                self.meta(fd, st, _kept_xattrs(path))
                os.utime(fd, ns=times)
            finally:
                os.close(fd)
        elif st.st_nlink > 1 and self.link(pfd, leaf, parts, st):
            pass
        elif stat.S_ISREG(mode):
            src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                dst = os.open(leaf, flags, 0o600, dir_fd=pfd)
                try:
                    sparse = st.st_blocks * 512 < st.st_size
                    for offset, length in _data_extents(src, st.st_size) if sparse else [(0, st.st_size)]:
                        _copy(src, offset, dst, offset, length)
                    os.ftruncate(dst, st.st_size)
                    self.meta(dst, st, _kept_xattrs(src))
                    os.utime(dst, ns=times)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
        else:
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(path), leaf, dir_fd=pfd)
            elif stat.S_ISFIFO(mode):
                os.mkfifo(leaf, 0o600, dir_fd=pfd)
            else:
                os.mknod(leaf, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=pfd)
            os.chown(leaf, st.st_uid, st.st_gid, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISLNK(mode):
                os.chmod(leaf, stat.S_IMODE(mode), dir_fd=pfd, follow_symlinks=False)
            _sync_xattrs(f"/proc/self/fd/{pfd}/{leaf}", _kept_xattrs(path))
            os.utime(leaf, ns=times, dir_fd=pfd, follow_symlinks=False)

    def link(self, pfd: int, leaf: str, parts: _Parts, st: os.stat_result) -> bool:
        """Hard-link leaf to an earlier path restored from the same image inode, if there is one."""
        first = self.links.setdefault((st.st_dev, st.st_ino), parts)
        tfd = None if first == parts else _open_dir(self.rootfd, first[:-1], create=False)
        if tfd is None:
            return False
        try:
            os.link(first[-1], leaf, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)
        return True

    def set_dir_times(self) -> None:
        for parts, st in self.dir_times:
            fd = _open_dir(self.rootfd, parts, create=False)
            if fd is not None:
                try:
                    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(fd)


def keep_image(rootfs: str) -> str:
    """Hard links to everything in a rootfs that is no overlay mount, in a new directory beside
    it: the image's version of its files, for revert_diff to take as its one lower layer.

    A rootfs that is a plain directory (runc bundles, Docker's vfs driver) has no image layers
    to put back what apply_diff replaced, and a failed restore would leave the fresh start a
    damaged rootfs. apply_diff replaces files, never writes through them, so links keep them as
    they were; directories are made anew with the same owner, mode, xattrs and times. LayerError
    where links cannot be made (the rootfs is a mount of another filesystem).
    """
    parent, name = os.path.split(os.path.normpath(rootfs))
    kept = tempfile.mkdtemp(prefix=f".{name}.image-", dir=parent)
    try:
        _link_tree(rootfs, kept)
    except (OSError, RecursionError) as e:
        shutil.rmtree(kept, ignore_errors=True)
        raise LayerError(
            f"cannot keep the image of {rootfs} (no overlay) to undo a failed restore: {e}"
        ) from e
    return kept


def _link_tree(src: str, dest: str) -> None:
    with os.scandir(src) as entries:
        for entry in entries:
            target = os.path.join(dest, entry.name)
            if entry.is_dir(follow_symlinks=False):
                os.mkdir(target)
                _link_tree(entry.path, target)
            else:
                os.link(entry.path, target, follow_symlinks=False)
    fd = os.open(dest, _DIR_FLAGS)
    try:
        st = os.stat(src, follow_symlinks=False)
        _Reverter.meta(fd, st, _kept_xattrs(src))
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)


def revert_diff(tar_path: str, rootfs: str, lowerdirs: list[str]) -> dict:
    """Undo apply_diff on a new container's mounted overlay rootfs, for a fresh start of the job.

    When `runc restore` fails after the diff was laid on, the job starts anew and needs the image
    as it was. Every path the archive touched (its entries, whiteout targets and opaque
    directories, and the directories above them) is removed from rootfs, and the image's version,
    looked up in `lowerdirs` (topmost first, see lowerdirs_of) by overlay's whiteout and opaque
    rules, is copied back with owner, mode, times and xattrs; a directory that was emptied or
    replaced comes back with all its contents. It works through the mount, never on the upperdir,
    so that overlay keeps its own whiteouts, opaque flags and caches consistent. Same safety rules
    as apply_diff: a hostile archive is refused before anything is changed, and no symlink, in
    rootfs or in the layers, is followed. Returns {removed, restored}: paths removed (a tree
    counts once) and entries given the image's version (directories whose metadata alone was
    reset included).
    """
    touched: set[_Parts] = set()
    full: set[_Parts] = set()
    for step in _read_plan(tar_path, diff=True):
        touched.update(step.parts[:i] for i in range(len(step.parts) + 1))
        if step.kind in ("whiteout", "opaque"):
            full.add(step.parts)
    try:
        rootfd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise LayerError(f"cannot open rootfs {rootfs}: {e}") from e
    reverter = _Reverter(rootfd, lowerdirs)
    done: set[_Parts] = set()
    parts: _Parts | None = None
    try:
        for parts in sorted(touched):  # a directory sorts before everything in it
            if any(parts[:i] in done for i in range(len(parts))):
                continue
            if reverter.revert(parts, parts in full):
                done.add(parts)
        parts = None
        reverter.set_dir_times()
    except OSError as e:
        where = f" at {'/' + '/'.join(parts)!r}" if parts is not None else ""
        raise LayerError(f"cannot revert {tar_path} on {rootfs}{where}: {e}") from e
    except RecursionError as e:
        raise LayerError(f"cannot revert {tar_path} on {rootfs}: directory tree too deep") from e
    finally:
        os.close(rootfd)
    return reverter.stats

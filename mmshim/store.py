"""Checkpoint storage: content-addressed, zstd-compressed, crash-safe; on a local dir or in S3.

A checkpoint is a directory tree (the engine's staging dir: CRIU images, rootfs.tar, mounts/*.tar)
plus a metadata dict. The repository layout follows restic's ideas: file data lives in shared,
immutable, content-addressed chunks; a checkpoint is a small manifest naming its chunks, written
last. Two checkpoints of a barely changed container share almost all chunks, so the second one
uploads only what changed.

URLs: ``file:///abs/path`` (or a bare absolute path) and ``s3://bucket/prefix``.

Repository format (version 2, or 3 where a manifest names packs), keys relative to the store root
------------------------------------------------------------------
``chunks/<sha[:2]>/<sha>``
    One chunk of a file: the raw bytes whose BLAKE3 hash (256 bits, hex) is <sha>, as they are
    when they do not compress (``stored_len`` == ``raw_len``; see _compress), else a single zstd
    frame of them (level 1 by default). Earlier writers stored a chunk that did not compress as a
    zstd frame of raw blocks; such chunks are read in place like plain ones. BLAKE3, not SHA-256:
    a checkpoint hashes every byte of the container's memory inside the Spot window, and BLAKE3
    does 4 GiB/s per core here against SHA-256's 1.2. (Version 1 named chunks by SHA-256; its
    manifests are refused as unusable.) Files are cut at fixed offsets (``chunk_size``, default
    4 MiB, a multiple of the page size) so an unchanged run of memory pages in a CRIU page image
    yields the same chunks in the next dump. Chunks are immutable and written at most once; a
    save skips a chunk that already exists (and that gc cannot be about to delete, see below).
``jobs/<job>/checkpoints/<checkpoint_id>.json``
    The manifest. ``checkpoint_id`` is ``YYYYmmddTHHMMSS.mmmZ-<6 hex>`` (UTC, sorts by time). The
    file is exactly ``{"manifest":<body>,"sha256":"<hex>"}`` + newline, where <hex> is the SHA-256 of
    the bytes of <body>, so a truncated or altered manifest is detected. <body> holds::

        {"format": 2 or 3, "job_id", "checkpoint_id", "created" (epoch s), "chunk_size",
         "compression": "zstd", "size" (raw bytes), "stored" (bytes newly written), "meta": {...},
         "files": [{"name": "criu/pages-1.img", "size", "mode", "chunks": [[sha, raw_len, stored_len], ...]}]}

    ``name`` is relative, "/"-separated, without "", "." or ".." parts. ``stored_len`` (the chunk
    object's size) lets a download skip a HEAD. In format 3 a chunk may instead be
    ``[sha, raw_len, raw_len, pack, offset]``: stored plain at ``offset`` in the job's pack
    ``pack`` (below); a manifest without such chunks is written as format 2. The manifest is
    written after every chunk it names is durable, in one atomic step (file: temp file + fsync +
    rename + fsync of the dir; S3: one PUT), so a crash never leaves a manifest that looks
    complete but is not.
``jobs/<job>/packs/<checkpoint_id>-<n>``
    A file of the caller's scratch that a file store took over whole (save's ``release``): a
    checkpoint's page image, renamed into the store instead of copied, holding in place the
    chunk-size chunks of it that did not compress and were new, the rest punched out of it
    (holes). Why: copying 2 GiB of random memory into chunk files, then writing them back, took
    1.6 to 3.0 s after the dump here; hashing the image where CRIU wrote it and making it
    durable takes 1.1 to 1.4 s (fsync alone about 1.0 s). Only where the scratch is on the
    store's file system; an S3 store never has packs. Named by the save that made it; later
    checkpoints of the job reference its ranges. gc deletes a pack no kept manifest references
    and punches out the ranges none does.
``jobs/<job>/inflight/<checkpoint_id>``
    JSON ``{"created", "host", "pid"}``, written before a save's first chunk and removed after its
    manifest. While one younger than the grace period exists, gc deletes nothing.
``jobs/<job>/bad/<checkpoint_id>``
    JSON ``{"reason", "time", "host"}``: the checkpoint failed verification (missing or corrupt
    chunk, bad manifest) and is never offered again by latest_good/fetch_latest.
``jobs/<job>/events/<YYYYmmddTHHMMSS.uuuuuuZ-<6 hex>>.json``
    Small JSON documents: the job's history, in time order.
``jobs/<job>/digest.json``
    Derived data (mmshim.digest): the job's events and checkpoints boiled down, so that a viewer
    reads one object per job. Updated after each event and checkpoint change by read, change,
    write, read back (a concurrent writer's lost update is redone, up to 3 times); rebuilt from
    the events and manifests when missing or unreadable. Losing it loses nothing.

Files whose name starts with ``.tmp-`` are a file-store's temp files, never part of the format;
gc removes old ones.

Why gc is safe without locks: gc never deletes a chunk younger than its grace period, nor anything
while a fresh in-flight marker exists, and looks for markers and new manifests again right before
deleting. A save writes its marker first and reuses an existing chunk only if the chunk is younger
than half the grace period (else it rewrites it, which makes it young) or if a good manifest of
the same job references it. Residual risk, accepted: gc run with a grace shorter than a save, or
``retain`` of a job running concurrently with a save of the same job.

Job ids are checked by validate_job_id; names in a manifest are checked again at fetch time and
files are created through directory descriptors with O_NOFOLLOW, so nothing is ever written
outside the destination directory.
"""

from __future__ import annotations

import bisect
import calendar
import collections
import concurrent.futures as cf
import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import mmap
import os
import re
import secrets
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import unquote, urlparse

import blake3
import msgspec
import zstandard

from mmshim import digest, libc

__all__ = [
    "FORMAT",
    "CheckpointInfo",
    "CheckpointUnusable",
    "Gate",
    "InvalidJobId",
    "Store",
    "StoreError",
    "chunk_hash",
    "encode_manifest",
    "open_store",
    "validate_job_id",
]

log = logging.getLogger("mmshim.store")

FORMAT = 2
FORMAT_PACKED = 3  # a manifest naming packs; FORMAT readers would take its chunk entries for damage
KiB = 1024
MiB = 1024 * KiB
DEFAULT_CHUNK_SIZE = 4 * MiB
DEFAULT_CONCURRENCY = 8
DEFAULT_GRACE_SECONDS = 6 * 3600.0
DEFAULT_COMPRESSION_LEVEL = 1
MODE_MASK = 0o777  # no setuid/setgid/sticky from a manifest
POLL_SECONDS = 0.2  # how often a save re-scans files that are still growing

_JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_CID_RE = re.compile(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{6}")
_EVENT_RE = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}\.json")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_PACK_RE = re.compile(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{6}-\d{1,6}")
_TMP_PREFIX = ".tmp-"
_MANIFEST_HEAD = b'{"manifest":'


class StoreError(Exception):
    """Any failure of the store; the message is meant for an operator."""


class InvalidJobId(StoreError):
    """A job id that could not be used safely as a key or path component."""


class CheckpointUnusable(StoreError):
    """The checkpoint cannot be restored (missing/corrupt chunk, damaged manifest)."""


class _NotFound(StoreError):
    """The object does not exist (internal: callers turn it into something meaningful)."""


@dataclass
class CheckpointInfo:
    job_id: str
    checkpoint_id: str
    created: float  # epoch seconds, when the save started
    size: int  # raw bytes of all files
    stored: int  # compressed chunk bytes this save newly wrote
    state: str  # "good" | "bad"
    meta: dict[str, Any] = field(default_factory=dict)
    deferred: dict[str, DeferredFile] = field(default_factory=dict, repr=False)  # fetch(defer=...)


# Test hook: called at named points of a save (crash-safety tests make it os._exit). Never set in
# production; a no-op check costs nothing.
_fault_hook: Callable[..., None] | None = None


def _fault(point: str, **info: Any) -> None:
    if _fault_hook is not None:
        _fault_hook(point, **info)


# ---------------------------------------------------------------------------------------------
# Names and ids


def validate_job_id(job_id: str) -> str:
    """Return the job id as used in keys and paths (unchanged), or raise InvalidJobId.

    Batch ids are UUIDs, array children ``uuid:index``; anything that could escape the job's
    prefix ("/", "..", "\\", control characters) is refused rather than escaped, so that a key is
    always readable and maps to exactly one id.
    """
    if not isinstance(job_id, str):
        raise InvalidJobId(f"job id must be a string, not {type(job_id).__name__}")
    if not job_id:
        raise InvalidJobId("job id is empty")
    if len(job_id) > 128:
        raise InvalidJobId(f"job id is {len(job_id)} characters long; at most 128 are allowed")
    if ".." in job_id:
        raise InvalidJobId(f"job id {job_id!r} contains '..'")
    if not _JOB_RE.fullmatch(job_id):
        raise InvalidJobId(
            f"job id {job_id!r} is not allowed: use letters, digits and . _ : - only, "
            "starting with a letter or digit (no '/', '\\', spaces or control characters)"
        )
    return job_id


def _check_checkpoint_id(checkpoint_id: str) -> str:
    if not isinstance(checkpoint_id, str) or not _CID_RE.fullmatch(checkpoint_id):
        raise StoreError(f"invalid checkpoint id {checkpoint_id!r} (expected YYYYmmddTHHMMSS.mmmZ-xxxxxx)")
    return checkpoint_id


def _check_name(name: Any) -> str:
    """A file name from a tree or a manifest: relative, normalized, no way out of its root."""
    if not isinstance(name, str) or not name:
        raise CheckpointUnusable(f"invalid file name {name!r}")
    if name.startswith("/") or "\\" in name or any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise CheckpointUnusable(f"refusing file name {name!r}: absolute or with forbidden characters")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise CheckpointUnusable(f"refusing file name {name!r}: empty, '.' or '..' component")
    return name


def _new_checkpoint_id(now: float) -> str:
    ms = int(now * 1000) % 1000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{ms:03d}Z-{secrets.token_hex(3)}"


def _checkpoint_time(checkpoint_id: str) -> float:
    return (
        calendar.timegm(time.strptime(checkpoint_id[:15], "%Y%m%dT%H%M%S")) + int(checkpoint_id[16:19]) / 1000
    )


_event_lock = threading.Lock()
_last_event_us = 0


def _new_event_id(now: float) -> str:
    """Time-sortable and strictly increasing within this process (events keep their order)."""
    global _last_event_us
    with _event_lock:
        us = max(int(now * 1_000_000), _last_event_us + 1)
        _last_event_us = us
    secs, frac = divmod(us, 1_000_000)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(secs)) + f".{frac:06d}Z-{secrets.token_hex(3)}"


def _chunk_key(sha: str) -> str:
    return f"chunks/{sha[:2]}/{sha}"


def _job_prefix(job: str) -> str:
    return f"jobs/{job}/"


def _manifest_key(job: str, cid: str) -> str:
    return f"jobs/{job}/checkpoints/{cid}.json"


def _pack_key(job: str, name: str) -> str:
    return f"jobs/{job}/packs/{name}"


def _locate(sha: str, place: Place | None) -> tuple[str, int | None]:
    """Where a chunk's stored bytes are: its own object (whole), or a range of a pack."""
    return place if place is not None else (_chunk_key(sha), None)


# What a PUT takes: bytes, or pieces written in one writev (a chunk framed without copying it).
Raw = bytes | bytearray | mmap.mmap  # a chunk's bytes: read, or mapped (_map_chunk)
Data = bytes | list[bytes | memoryview]
_SAMPLE = 16 * KiB
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_RAW_FRAME_START = _ZSTD_MAGIC + b"\xe0"  # then: single segment, 8-byte content size, no checksum
_SPILL_BUDGET = 512 * MiB  # recurring chunks of a streamed file kept decoded on disk (_Spill)
# Threads verifying a streamed file: all cores but one, which the reader (CRIU) needs. Downloads
# run ahead in the transfer threads whatever this is.
_STREAM_CPU_THREADS = max(1, (os.cpu_count() or 2) - 1)


def _raw_ranges(data: bytes, raw_len: int) -> list[tuple[int, int]] | None:
    """Where a stored chunk's raw data lies in it, for a restore to send it without decoding (one
    copy less per byte, none from a file store): all of a plain chunk, or the blocks of a zstd
    frame of raw blocks (RFC 8878 3.1: single segment, 8-byte content size, no checksum; how
    earlier writers stored chunks that did not compress). None for a compressed frame."""
    if len(data) == raw_len:
        return [(0, raw_len)]
    head = len(_RAW_FRAME_START) + 8
    if data[: head - 8] != _RAW_FRAME_START or int.from_bytes(data[head - 8 : head], "little") != raw_len:
        return None
    pos, ranges = head, []
    while pos + 3 <= len(data):
        h = int.from_bytes(data[pos : pos + 3], "little")
        size, pos = h >> 3, pos + 3
        if (h >> 1) & 3 or pos + size > len(data):  # not a raw block, or cut short
            return None
        ranges.append((pos, pos + size))
        pos += size
        if h & 1:
            return ranges if pos == len(data) else None
    return None


def chunk_hash(raw: Raw) -> str:
    """A chunk's name: its BLAKE3 hash in hex (the binding releases the GIL, so threads scale)."""
    return blake3.blake3(raw).hexdigest()


def _digest_key(job: str) -> str:
    return f"jobs/{job}/digest.json"


def _bad_key(job: str, cid: str) -> str:
    return f"jobs/{job}/bad/{cid}"


def _inflight_key(job: str, cid: str) -> str:
    return f"jobs/{job}/inflight/{cid}"


def _json_bytes(doc: Any) -> bytes:
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise StoreError(f"not JSON-serializable: {e}") from e


# ---------------------------------------------------------------------------------------------
# Manifest encoding


def encode_manifest(doc: dict[str, Any]) -> bytes:
    """A manifest file's bytes (see the module docstring); also what sample stores are made of."""
    body = _json_bytes(doc)
    return _MANIFEST_HEAD + body + b',"sha256":"' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def _decode_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and verify a manifest; CheckpointUnusable if truncated, altered or malformed."""
    if not data.startswith(_MANIFEST_HEAD):
        raise CheckpointUnusable(f"manifest {where} is damaged: bad header ({len(data)} bytes)")
    try:
        text = data.decode("ascii")
        doc, end = json.JSONDecoder().raw_decode(text, len(_MANIFEST_HEAD))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointUnusable(f"manifest {where} is damaged or truncated ({len(data)} bytes): {e}") from e
    m = re.fullmatch(r',"sha256":"([0-9a-f]{64})"\}\n?', text[end:])
    if not m:
        raise CheckpointUnusable(f"manifest {where} is truncated: checksum missing ({len(data)} bytes)")
    if hashlib.sha256(data[len(_MANIFEST_HEAD) : end]).hexdigest() != m.group(1):
        raise CheckpointUnusable(f"manifest {where} is damaged: checksum mismatch")
    if not isinstance(doc, dict) or doc.get("format") not in (FORMAT, FORMAT_PACKED):
        raise CheckpointUnusable(f"manifest {where} has unknown format {doc.get('format')!r}")
    return doc


Chunk = tuple[str, int, int]  # sha, raw length, stored length
Place = tuple[str, int]  # a packed chunk's pack (key) and offset in it


@dataclass
class _FileEntry:
    name: str
    size: int
    mode: int
    chunks: list[Chunk]
    places: dict[str, Place]  # sha -> where in a pack, for packed chunks


def _manifest_files(doc: dict[str, Any], where: str, job: str) -> list[_FileEntry]:
    """The manifest's files, checked so that a fetch can trust them (names, sizes, chunk lists)."""

    def bad(why: str) -> CheckpointUnusable:
        return CheckpointUnusable(f"manifest {where} is invalid: {why}")

    files = doc.get("files")
    if not isinstance(files, list):
        raise bad("no file list")
    out: list[_FileEntry] = []
    names: set[str] = set()
    dirs: set[str] = set()
    for f in files:
        if not isinstance(f, dict):
            raise bad("file entry is not an object")
        name = _check_name(f.get("name"))
        size, mode, chunks = f.get("size"), f.get("mode"), f.get("chunks")
        if not isinstance(size, int) or size < 0 or not isinstance(mode, int) or not isinstance(chunks, list):
            raise bad(f"bad size/mode/chunks for {name!r}")
        entries = []
        places: dict[str, Place] = {}
        for c in chunks:
            if (
                not isinstance(c, list)
                or len(c) not in ((3, 5) if doc.get("format") == FORMAT_PACKED else (3,))
                or not isinstance(c[0], str)
                or not _SHA_RE.fullmatch(c[0])
                or not all(isinstance(n, int) and n > 0 for n in c[1:3])
            ):
                raise bad(f"bad chunk entry {c!r} for {name!r}")
            if len(c) == 5:  # packed: stored plain, at an offset of a pack of this job
                pack, at = c[3], c[4]
                placed = isinstance(pack, str) and _PACK_RE.fullmatch(pack) and isinstance(at, int)
                if not placed or at < 0:
                    raise bad(f"bad chunk entry {c!r} for {name!r}")
                if c[2] != c[1]:
                    raise bad(f"packed chunk {c!r} for {name!r} is not stored plain")
                places[c[0]] = (_pack_key(job, pack), at)
            entries.append((c[0], c[1], c[2]))
        if sum(c[1] for c in entries) != size:
            raise bad(f"chunks of {name!r} do not add up to its size {size}")
        if name in names or name in dirs:
            raise bad(f"duplicate name {name!r}")
        parents = {name.rsplit("/", i)[0] for i in range(1, name.count("/") + 1)}
        if parents & names:
            raise bad(f"{name!r} is inside a file")
        names.add(name)
        dirs |= parents
        out.append(_FileEntry(name, size, mode & MODE_MASK, entries, places))
    return out


# ---------------------------------------------------------------------------------------------
# Backends: a flat key/value space with atomic whole-object PUTs, sorted listings and async
# chunk transfers.


@dataclass(frozen=True)
class _Obj:
    key: str  # relative to the store root
    size: int
    mtime: float


class _Transfers(Protocol):
    """Chunk transfers of one save or fetch; futures complete from the transfer threads."""

    def put(self, key: str, data: Data) -> cf.Future[None]: ...
    def get(self, key: str, size: int, at: int | None = None) -> cf.Future[bytes]: ...
    def durable(self) -> None: ...
    def __enter__(self) -> _Transfers: ...
    def __exit__(self, *exc: object) -> None: ...


class _Backend(Protocol):
    url: str

    def put(self, key: str, data: bytes, *, bulk: bool = False) -> None: ...
    def get(self, key: str, at: int | None = None, size: int = 0) -> bytes:
        """The object's bytes; with ``at``, ``size`` of them from there."""
        ...

    def head(self, key: str) -> _Obj | None: ...
    def list(self, prefix: str) -> Iterator[_Obj]: ...
    def list_dirs(self, prefix: str) -> list[str]: ...
    def delete(self, keys: Iterable[str]) -> None: ...
    def transfers(self) -> _Transfers: ...
    def trim(self, key: str, keep: list[tuple[int, int]]) -> int: ...
    def sweep(self, older_than: float) -> int: ...
    def close(self) -> None: ...


def _write_all(fd: int, data: Data) -> None:
    """os.writev until done (a module function so tests can simulate a full disk)."""
    bufs = [memoryview(b) for b in (data if isinstance(data, list) else [data])]
    while bufs:
        n = os.writev(fd, bufs[:1024])
        while n:
            if n >= len(bufs[0]):
                n -= len(bufs.pop(0))
            else:
                bufs[0], n = bufs[0][n:], 0


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileBackend:
    """Keys are paths under root; every PUT is temp file + fsync + rename + fsync(dir). A save's
    chunks are staged as they are written and published together once all are (publish)."""

    def __init__(self, root: Path, concurrency: int) -> None:
        self.root = root
        self.url = f"file://{root}"
        self._concurrency = concurrency
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {root}: {e}") from e

    def _path(self, key: str) -> str:
        """A string, not a Path: a viewer's first load makes one per job (pathlib costs 10x more)."""
        rel = key.rstrip("/")
        if any(p in ("", ".", "..") for p in rel.split("/")):  # keys are built from checked ids only
            raise StoreError(f"internal error: unsafe key {key!r}")
        return f"{self.root}/{rel}"

    def _error(self, op: str, path: str, e: OSError) -> StoreError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreError(f"no space left on device while writing {path} (store {self.root})")
        return StoreError(f"cannot {op} {path}: {e.strerror or e}")

    def put(self, key: str, data: Data, *, bulk: bool = False) -> None:
        self.publish([self.stage(key, data)])

    def stage(self, key: str, data: Data) -> tuple[str, str]:
        """Write ``data`` into a temp file beside the key's path and start its writeback (not
        waited for); publish makes it durable and visible. Returns (temp path, path)."""
        path = self._path(key)
        parent, name = os.path.split(path)
        tmp = f"{parent}/{_TMP_PREFIX}{name}-{secrets.token_hex(4)}"
        fd = -1
        for attempt in range(3):  # the parent may be missing, or pruned by a concurrent delete
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                break
            except FileNotFoundError as e:
                if attempt == 2:
                    raise self._error("create", tmp, e) from e
                try:
                    os.makedirs(parent, exist_ok=True)
                except OSError as e2:
                    raise self._error("create", parent, e2) from e2
            except OSError as e:
                raise self._error("create", tmp, e) from e
        try:
            try:
                _write_all(fd, data)
                libc.start_writeback(fd)  # published (fsynced) with the rest
            finally:
                os.close(fd)
            _fault("tmp_written", key=key)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise self._error("write", path, e) from e
            raise
        return tmp, path

    def publish(self, staged: list[tuple[str, str]]) -> None:
        """Staged files made durable (fsync), then visible under their paths (rename, fsync of
        their directories): never visible before durable, so a crash leaves no torn object that
        a later save would take for a stored chunk. Many at once: after the first fsync the rest
        find their data written and the journal committed (a save's 2 GiB of chunks, each
        fsynced as written: 3.0 to 8.3 s here; started by stage, published together: 1.8 to 2.1 s,
        about a plain write and sync)."""
        done, path = 0, ""
        try:
            for path, _ in staged:  # the temp files
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for tmp, path in staged:
                os.replace(tmp, path)
                done += 1
            for path in sorted({os.path.dirname(p) for _, p in staged}):
                _fsync_dir(path)
        except OSError as e:
            for tmp, _ in staged[done:]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise self._error("write", path, e) from e

    def get(self, key: str, at: int | None = None, size: int = 0) -> bytes:
        fd, data = self.open_read(key, at, size)
        os.close(fd)
        return data

    def open_read(self, key: str, at: int | None = None, size: int = 0) -> tuple[int, bytes]:
        """The file, open (the caller closes it), and its bytes; with ``at``, ``size`` of them
        from there (fewer where it ends sooner: a packed chunk then fails its check)."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _NotFound(f"{path} does not exist") from None
        except OSError as e:
            raise self._error("read", path, e) from e
        try:
            if at is not None:
                return fd, os.pread(fd, size, at)
            with open(fd, "rb", closefd=False) as f:
                return fd, f.read()
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError):
                raise self._error("read", path, e) from e
            raise

    def head(self, key: str) -> _Obj | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._error("stat", self._path(key), e) from e
        return _Obj(key, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> Iterator[_Obj]:
        base = self._path(prefix)
        found: list[_Obj] = []
        try:
            for dirpath, _dirs, files in os.walk(base, onerror=_raise):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                for name in files:
                    if name.startswith(_TMP_PREFIX):
                        continue
                    try:
                        st = os.lstat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        found.append(_Obj(f"{rel}/{name}", st.st_size, st.st_mtime))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._error("list", base, e) from e
        found.sort(key=lambda o: o.key)
        return iter(found)

    def list_dirs(self, prefix: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._path(prefix)) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise self._error("list", self._path(prefix), e) from e

    def delete(self, keys: Iterable[str]) -> None:
        parents: set[Path] = set()
        jobs = self.root / "jobs"
        for key in keys:
            path = Path(self._path(key))
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise self._error("delete", str(path), e) from e
            parents.update(p for p in path.parents if p.is_relative_to(jobs) and p != jobs)
        # Prune emptied job directories so jobs() forgets deleted jobs; chunk dirs stay (saves
        # write into them concurrently and there are only 256).
        for p in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                p.rmdir()

    def transfers(self) -> _FileTransfers:
        return _FileTransfers(self)

    def trim(self, key: str, keep: list[tuple[int, int]]) -> int:
        """Punch out of a pack every range but ``keep`` ((offset, length)); the bytes freed."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise self._error("trim", path, e) from e
        try:
            before, at = os.fstat(fd).st_blocks, 0
            for offset, length in [*sorted(keep), (os.fstat(fd).st_size, 0)]:
                if offset > at:
                    libc.punch_hole(fd, at, offset - at)
                at = max(at, offset + length)
            return (before - os.fstat(fd).st_blocks) * 512
        finally:
            os.close(fd)

    def sweep(self, older_than: float) -> int:
        """Remove temp files left by crashed writers."""
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    if name.startswith(_TMP_PREFIX) and os.lstat(path).st_mtime < older_than:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def close(self) -> None:
        pass


def _raise(e: OSError) -> None:
    raise e


class _FileTransfers:
    """Chunk I/O of one operation on a small thread pool."""

    def __init__(self, backend: _FileBackend) -> None:
        self._backend = backend
        self._pool = cf.ThreadPoolExecutor(backend._concurrency, thread_name_prefix="mmshim-store-io")
        self._staged: list[tuple[str, str]] = []  # put, not yet durable (temp path, path)

    def put(self, key: str, data: Data) -> cf.Future[None]:
        """Staged (written, its writeback started); durable and visible after durable()."""
        return self._pool.submit(lambda: self._staged.append(self._backend.stage(key, data)))

    def adopt(self, path: str, key: str) -> bool:
        """Take the file at ``path`` whole as the object ``key``, durable and visible after
        durable() (renamed, not copied); False where it is on another file system."""
        dest = self._backend._path(key)
        try:
            if os.stat(path).st_dev != os.stat(self._backend.root).st_dev:
                return False
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        except OSError as e:
            raise self._backend._error("adopt", path, e) from e
        self._staged.append((path, dest))
        return True

    def durable(self) -> None:
        staged, self._staged = self._staged, []
        self._backend.publish(staged)

    def get(self, key: str, size: int, at: int | None = None) -> cf.Future[bytes]:
        return self._pool.submit(self._backend.get, key, at, size)

    def open(
        self, key: str, opened: set[int], at: int | None = None, size: int = 0
    ) -> cf.Future[tuple[int, bytes]]:
        """The file of a chunk (or a pack), open, and the chunk's bytes: a restore sends what
        verified from the file. The descriptor is in ``opened`` before the future completes; the
        caller closes it."""

        def task() -> tuple[int, bytes]:
            fd, data = self._backend.open_read(key, at, size)
            opened.add(fd)
            return fd, data

        return self._pool.submit(task)

    def __enter__(self) -> _FileTransfers:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)
        for tmp, _ in self._staged:  # a failed save's: never published
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@functools.cache
def _subscriber_class() -> type:
    """A TransferManager subscriber completing a concurrent.futures.Future (s3transfer is lazy)."""
    from s3transfer.subscribers import BaseSubscriber

    class FutureSubscriber(BaseSubscriber):
        def __init__(self, target: cf.Future, value: Callable[[], Any], size: int | None, error: Callable):
            self._target, self._value, self._size, self._error = target, value, size, error

        def on_queued(self, future: Any, **kwargs: Any) -> None:
            if self._size is not None:
                future.meta.provide_transfer_size(self._size)  # saves a HEAD per chunk

        def on_done(self, future: Any, **kwargs: Any) -> None:
            try:
                future.result()
            except BaseException as e:
                self._target.set_exception(self._error(e))
            else:
                self._target.set_result(self._value())

    return FutureSubscriber


class _S3Backend:
    """boto3 client with botocore's standard retries; chunk transfers through s3transfer."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        region: str | None,
        profile: str | None,
        sse: str | None,
        kms_key_id: str | None,
        storage_class: str | None,
        concurrency: int,
        chunk_size: int,
        max_attempts: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        import boto3
        import botocore.exceptions
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix}"
        self._concurrency, self._chunk_size, self._max_attempts = concurrency, chunk_size, max_attempts
        try:
            session = boto3.session.Session(profile_name=profile, region_name=region)
            self.client = session.client(
                "s3",
                endpoint_url=endpoint_url,
                config=Config(
                    retries={"mode": "standard", "max_attempts": max_attempts},
                    max_pool_connections=2 * concurrency + 4,
                    connect_timeout=connect_timeout,
                    read_timeout=read_timeout,
                ),
            )
        except botocore.exceptions.BotoCoreError as e:
            raise StoreError(f"cannot set up S3 client for {self.url}: {e}") from e
        self._sse: dict[str, str] = {}
        if sse:
            self._sse["ServerSideEncryption"] = sse
        if kms_key_id:
            self._sse["SSEKMSKeyId"] = kms_key_id
        self._bulk = dict(self._sse, **({"StorageClass": storage_class} if storage_class else {}))

    def _k(self, key: str) -> str:
        return self.prefix + key

    def error(self, op: str, key: str, e: BaseException) -> StoreError:
        """Map a botocore/s3transfer failure to a StoreError an operator can act on."""
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if isinstance(e, StoreError):
            return e
        where = f"s3://{self.bucket}/{self._k(key)}"
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", "?"))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                return _NotFound(f"{where} does not exist")
            if code == "NoSuchBucket":
                return StoreError(f"S3 bucket {self.bucket!r} does not exist ({op} {where})")
            return StoreError(f"S3 {op} {where} failed: {code} (HTTP {status}): {err.get('Message', '')}")
        if isinstance(e, BotoConnectionError | HTTPClientError):
            return StoreError(
                f"S3 {op} {where} failed: cannot reach {self.client.meta.endpoint_url} "
                f"(after {self._max_attempts} attempts): {e}"
            )
        if isinstance(e, BotoCoreError):
            return StoreError(f"S3 {op} {where} failed: {e}")
        return StoreError(f"S3 {op} {where} failed: {type(e).__name__}: {e}")

    def put(self, key: str, data: bytes, *, bulk: bool = False) -> None:
        extra = self._bulk if bulk else self._sse
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **extra)
        except Exception as e:
            raise self.error("PUT", key, e) from e

    def get(self, key: str, at: int | None = None, size: int = 0) -> bytes:
        ranged = {} if at is None else {"Range": f"bytes={at}-{at + size - 1}"}
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key), **ranged)["Body"].read()
        except Exception as e:
            raise self.error("GET", key, e) from e

    def head(self, key: str) -> _Obj | None:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as e:
            err = self.error("HEAD", key, e)
            if isinstance(err, _NotFound):
                return None
            raise err from e
        return _Obj(key, r["ContentLength"], r["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[_Obj]:
        """Lazily paginated: a caller that stops early costs one request."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._k(prefix)
        )
        try:
            for page in pages:
                for o in page.get("Contents", []):
                    yield _Obj(o["Key"][len(self.prefix) :], o["Size"], o["LastModified"].timestamp())
        except Exception as e:
            raise self.error("LIST", prefix, e) from e

    def list_dirs(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._k(prefix), Delimiter="/"
        )
        try:
            return [
                p["Prefix"][len(self._k(prefix)) :].rstrip("/")
                for page in pages
                for p in page.get("CommonPrefixes", [])
            ]
        except Exception as e:
            raise self.error("LIST", prefix, e) from e

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            try:
                r = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._k(k)} for k in batch], "Quiet": True},
                )
            except Exception as e:
                raise self.error("DELETE", batch[0], e) from e
            if r.get("Errors"):
                first = r["Errors"][0]
                raise StoreError(
                    f"S3 DELETE of {len(r['Errors'])} objects failed, e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message', '')}"
                )

    def transfers(self) -> _S3Transfers:
        return _S3Transfers(self)

    def trim(self, key: str, keep: list[tuple[int, int]]) -> int:
        """Nothing: an object cannot be cut (a pack, from a file store copied here, stays whole
        until no manifest references any of it)."""
        return 0

    def sweep(self, older_than: float) -> int:
        return 0  # S3 PUTs leave no temp objects

    def close(self) -> None:
        self.client.close()


class _S3Transfers:
    """One s3transfer TransferManager per operation: bounded, retried, parallel chunk transfers."""

    def __init__(self, backend: _S3Backend) -> None:
        from s3transfer.manager import TransferConfig, TransferManager

        self._b = backend
        threshold = max(8 * MiB, 2 * backend._chunk_size)  # a chunk is always a single request
        self._tm = TransferManager(
            backend.client,
            TransferConfig(
                multipart_threshold=threshold,
                multipart_chunksize=threshold,
                max_request_concurrency=backend._concurrency,
                num_download_attempts=backend._max_attempts,
            ),
        )
        self._ranged: cf.ThreadPoolExecutor | None = None

    def put(self, key: str, data: Data) -> cf.Future[None]:
        target: cf.Future[None] = cf.Future()
        sub = _subscriber_class()(target, lambda: None, None, lambda e: self._b.error("PUT", key, e))
        body = b"".join(data) if isinstance(data, list) else data  # s3transfer reads a file object
        self._tm.upload(io.BytesIO(body), self._b.bucket, self._b._k(key), self._b._bulk, [sub])
        return target

    def get(self, key: str, size: int, at: int | None = None) -> cf.Future[bytes]:
        if at is not None:  # a packed chunk (a file store copied into S3): one ranged GET
            if self._ranged is None:
                self._ranged = cf.ThreadPoolExecutor(self._b._concurrency, thread_name_prefix="mmshim-s3")
            return self._ranged.submit(self._b.get, key, at, size)
        target: cf.Future[bytes] = cf.Future()
        buf = io.BytesIO()
        sub = _subscriber_class()(target, buf.getvalue, size, lambda e: self._b.error("GET", key, e))
        self._tm.download(self._b.bucket, self._b._k(key), buf, subscribers=[sub])
        return target

    def durable(self) -> None:
        """Nothing to do: a PUT that returned is durable and visible."""

    def __enter__(self) -> _S3Transfers:
        return self

    def __exit__(self, *exc: Any) -> None:
        # Not shutdown(cancel=True): s3transfer 0.19 passes its arguments on shifted there, and the
        # cancel raises TypeError ('str' object is not callable) in place of the caller's error.
        self._tm.__exit__(*exc)
        if self._ranged is not None:
            self._ranged.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# The store


class _Pipeline:
    """Bounds the work in flight (so memory is bounded) and keeps the first error.

    Every successful start(weight) is matched by exactly one finish(), from whichever thread
    ends that piece of work, which gives back what is left of its weight (shrink() gives back
    part of it earlier). A save weighs chunks by the bytes they hold: a compressed chunk that
    waits for a closed Gate holds little and must not stop the reading. One piece starts
    whatever its weight when nothing else is in flight.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pending = 0
        self._used = 0
        self._cv = threading.Condition()
        self.error: BaseException | None = None

    def start(self, weight: int = 1) -> bool:
        with self._cv:
            while self._pending and self._used + weight > self._limit and self.error is None:
                self._cv.wait()
            if self.error is not None:
                return False
            self._pending += 1
            self._used += weight
            return True

    def shrink(self, weight: int) -> None:
        with self._cv:
            self._used -= weight
            self._cv.notify_all()

    def finish(self, error: BaseException | None = None, weight: int = 1) -> None:
        with self._cv:
            if error is not None and self.error is None:
                self.error = error
            self._pending -= 1
            self._used -= weight
            self._cv.notify_all()

    def join(self) -> None:
        with self._cv:
            while self._pending:
                self._cv.wait()
        if self.error is not None:
            raise self.error


class _Progress:
    """Reports the running total of raw bytes done; a failing callback never fails the transfer."""

    def __init__(self, callback: Callable[[int], None] | None) -> None:
        self._callback = callback
        self._lock = threading.Lock()
        self.total = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n
            if self._callback is not None:
                try:
                    self._callback(self.total)
                except Exception:
                    log.exception("progress callback failed")


class Gate:
    """Holds a save's chunk writes until opened. A checkpoint's upload reads, hashes and
    compresses CRIU's images while CRIU writes them, but writing chunks to the store meanwhile
    takes page cache, memory bandwidth and disk from CRIU while the container is frozen (for
    incompressible memory the freeze was 0.15 to 0.42 s longer per 2 GiB: bench/checkpoint.py
    shows both). The opener must open it in every path: held chunks keep their place in the
    save's memory bound, so a save may wait for it.
    Chunks kept in a pack hold no memory, only the start of their writeback waits. Started
    during the dump, the writeback takes the disk from CRIU: in one bench/checkpoint.py run
    (2 GiB of random memory, medians of 5), CRIU's frozen time grew to 1.26x raw's (held: 0.98
    to 1.08x in others), while the commit still took 1.51x raw's time (a raw checkpoint and a
    sync: 1.81x), as the disk, not the order, sets it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[Callable[[], None]] | None = []  # None: open

    def open(self) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting or [], None
        for write in waiting:
            write()

    def call(self, write: Callable[[], None]) -> None:
        """Run ``write`` now if open, else when opened (in the opener's thread)."""
        with self._lock:
            if self._waiting is not None:
                self._waiting.append(write)
                return
        write()


@dataclass
class _SrcFile:
    name: str
    offset: int = 0  # bytes handed to the pipeline so far
    mode: int = 0o644
    chunks: list[list[Any]] = field(default_factory=list)  # [sha, raw_len], filled by workers
    pack: str | None = None  # the key it is published under, once a chunk stays in it
    adoptable: bool = True  # False: it is on another file system than the store


class Borrowed(Protocol):
    """Ranges of a file under save's src_dir left as holes there, their data read instead from
    files the caller holds open: a container's staged inputs go from its layer into the store
    without a copy on the work dir's disk (engine, layer.Capture)."""

    @property
    def extents(self) -> Sequence[tuple[int, int, int, int]]:
        """(at, fd, offset, count): the file's bytes at..at+count are fd's from offset on;
        sorted by at, disjoint."""
        ...

    def check(self) -> None:
        """Raise if the data read may not be the data meant (a file changed meanwhile); save
        calls it once the last chunk is read, before the manifest."""
        ...


class _Save:
    """State of one save, shared by the reader and the chunk workers."""

    def __init__(
        self,
        transfers: _Transfers,
        known: tuple[dict[str, int], dict[str, Place]],
        limit: int,
        progress: _Progress,
        gate: Gate,
        release: bool,
        packs: str,
    ) -> None:
        self.transfers = transfers
        self.release = release  # punch each chunk out of its source once stored (_release)
        self.gate = gate
        self.known = known[0]  # sha -> stored length, from this job's good manifests
        self.places = dict(known[1])  # sha -> place, of packed chunks known or kept in place
        self.packs = packs  # how the keys of this save's packs start
        # None: chunks are never kept in their source files (not the caller's scratch, or not a
        # file store).
        self.adopt = transfers.adopt if release and isinstance(transfers, _FileTransfers) else None
        self.pipe = _Pipeline(limit)
        self.progress = progress
        self.lock = threading.Lock()
        self.claimed: set[str] = set()
        self.sizes: dict[str, int] = {}
        self.stored = 0
        self.written = 0
        self.npacks = 0

    def pack_fields(self, sha: str) -> list[Any]:
        """What a manifest's chunk entry adds for a packed chunk: [pack name, offset]."""
        place = self.places.get(sha)
        return [] if place is None else [place[0].rsplit("/", 1)[1], place[1]]

    def reuse(self, chunk: Chunk, n: int, where: str) -> list[Any]:
        """The manifest entry of a chunk the caller knows (save's reuse)."""
        sha, raw, stored = chunk
        if raw != n or self.known.get(sha) != stored:
            raise StoreError(f"chunk {sha} offered for {where} is not one of this job's ({raw} bytes)")
        with self.lock:
            self.sizes[sha] = stored
        self.progress.add(raw)
        return [sha, raw]

    def claim(self, sha: str) -> bool:
        """True if this caller must make sure the chunk exists; False if it is taken care of."""
        with self.lock:
            if sha in self.known:
                self.sizes.setdefault(sha, self.known[sha])
                return False
            if sha in self.claimed:
                return False
            self.claimed.add(sha)
            return True


class _TreeWriter:
    """Creates files under a root without following any symlink; can undo what it created."""

    def __init__(self, dest: str | os.PathLike[str]) -> None:
        try:
            os.makedirs(dest, exist_ok=True)
            self.root = os.path.realpath(dest)
        except OSError as e:
            raise StoreError(f"cannot create {dest}: {e}") from e
        self.fds: list[int] = []
        self.files: list[str] = []
        self.dirs: list[str] = []

    def create(self, name: str, size: int) -> int:
        parts = name.split("/")
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            path = self.root
            for part in parts[:-1]:
                path = os.path.join(path, part)
                try:
                    os.mkdir(part, 0o755, dir_fd=dfd)
                    self.dirs.append(path)
                except FileExistsError:
                    pass
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                os.close(dfd)
                dfd = nfd
            path = os.path.join(path, parts[-1])
            fd = os.open(
                parts[-1],
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dfd,
            )
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StoreError(
                    f"cannot restore {name!r} into {self.root}: a path component is a symlink or "
                    "not a directory (symlinks are never followed)"
                ) from e
            raise StoreError(f"cannot create {name!r} in {self.root}: {e.strerror or e}") from e
        finally:
            os.close(dfd)
        self.fds.append(fd)
        self.files.append(path)
        try:
            os.ftruncate(fd, size)  # allocates nothing: zero ranges stay holes until written
        except OSError as e:
            raise StoreError(f"cannot size {path}: {e.strerror or e}") from e
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def rollback(self) -> None:
        self.close()
        for path in self.files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for path in reversed(self.dirs):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def _reason(marker: bytes) -> str:
    try:
        return str(json.loads(marker).get("reason", "?"))
    except (ValueError, AttributeError):
        return "?"


def _pwrite_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n


def _weight(raw_len: int, stored: int) -> int:
    """Bytes a chunk on its way to the store holds: its compressed form, or (stored plain, a view
    of them) the raw bytes."""
    return min(raw_len, stored)


def _map_chunk(fd: int, n: int, offset: int, writable: bool = False) -> mmap.mmap:
    """A chunk of a file being saved, mapped rather than read: hashing, compressing and writing it
    read the page cache directly, a copy of every byte less (a 2 GiB text-memory checkpoint
    committed in 1.31 s against 1.52 s read with pread, medians of 8). The range lies within the
    size just seen and stays backed because save's files only grow (CRIU's images, the layer tars):
    one cut shorter while mapped would fault (SIGBUS), not raise. ``writable`` only so that
    _release may punch it out (never written; a shared mapping is not dirtied by populating it)."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, n, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=prot, offset=offset)


def _chunk(fd: int, n: int, offset: int, writable: bool, lender: Borrowed | None, path: str) -> Raw:
    """A chunk of a file being saved: mapped (_map_chunk), or read where it borrows any bytes.
    Read, never mapped from the lender's file: what is hashed is then what is stored, even if
    the job writes to that file meanwhile (check() fails the save then, but a chunk whose data
    is not its hash would already be in the store, for later saves to take as stored)."""
    extents = lender.extents if lender is not None else ()
    end = offset + n
    first = bisect.bisect_right(extents, offset, key=lambda e: e[0] + e[3])  # the first ending after offset
    if first == len(extents) or extents[first][0] >= end:
        return _map_chunk(fd, n, offset, writable)
    buf = bytearray(n)
    view = memoryview(buf)
    at = offset
    for start, src, src_offset, count in extents[first:]:
        if start >= end:
            break
        lo, hi = max(start, offset), min(start + count, end)
        _read_into(fd, view[at - offset : lo - offset], at, path)
        _read_into(src, view[lo - offset : hi - offset], src_offset + lo - start, f"the data {path} borrows")
        at = hi
    _read_into(fd, view[at - offset :], at, path)
    return buf


def _read_into(fd: int, view: memoryview, offset: int, what: str) -> None:
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise StoreError(f"{what} shrank while it was being saved")
        view, offset = view[n:], offset + n


def _release(raw: Raw) -> None:
    """Punch a stored chunk's range out of its source file (save's ``release``): its page cache is
    free at once, for the next chunk's copy to take while it is still warm. On this VM (memory
    left free for 2 s goes back to the host, WARM_MIB in bench/checkpoint.py) copying 2 GiB of
    staged images into chunk files took 2.3 to 2.6 s, and 1.2 to 1.3 s with each range punched
    once copied; the staging never holds a second copy of the checkpoint either."""
    if isinstance(raw, mmap.mmap):
        with contextlib.suppress(OSError):  # a file system that cannot punch: the copy stays
            raw.madvise(mmap.MADV_REMOVE)


def _verified(fut: cf.Future[bytes], where: str, sha: str, raw_len: int) -> list[bytes | memoryview]:
    """A downloaded chunk's raw data (in place when stored plain), checked against its name."""
    return _decoded_checked(_downloaded(fut, where, sha), where, sha, raw_len)


def _downloaded(fut: cf.Future[Any], where: str, sha: str) -> Any:
    try:
        return fut.result()
    except _NotFound:
        raise CheckpointUnusable(f"checkpoint {where}: chunk {sha} is missing") from None


def _decoded_checked(data: bytes, where: str, sha: str, raw_len: int) -> list[bytes | memoryview]:
    parts = _decoded(data, where, sha, raw_len)
    _check(parts, where, sha, raw_len)
    return parts


def _check(parts: list[bytes | memoryview], where: str, sha: str, raw_len: int) -> None:
    """CheckpointUnusable unless ``parts`` are the chunk's raw data (BLAKE3 names it)."""
    hasher = blake3.blake3()
    for part in parts:
        hasher.update(part)
    if sum(map(len, parts)) != raw_len or hasher.hexdigest() != sha:
        raise CheckpointUnusable(f"checkpoint {where}: chunk {sha} is corrupt (checksum mismatch)")


def _decoded(data: bytes, where: str, sha: str, raw_len: int) -> list[bytes | memoryview]:
    ranges = _raw_ranges(data, raw_len)
    if ranges is not None:
        view = memoryview(data)
        return [view[a:b] for a, b in ranges]
    try:
        if zstandard.frame_content_size(data) != raw_len:
            raise zstandard.ZstdError("wrong content size")
        return [zstandard.ZstdDecompressor().decompress(data)]
    except zstandard.ZstdError as e:
        raise CheckpointUnusable(f"checkpoint {where}: chunk {sha} is corrupt: {e}") from None


@dataclass(frozen=True)
class _Span:
    """Bytes of an open chunk file that verified, or of a spill file (_Spill): sent to CRIU's pipe
    from the page cache (sendfile), not copied through a buffer. Chunk files are never rewritten
    in place (a save renames a new file over, gc unlinks), gc punches out of a pack only ranges
    that no kept manifest names, and spill slots are written once, so what was verified is what
    is sent."""

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


# A piece of a chunk's raw data as DeferredFile sends it: bytes in memory or a span of a file.
Piece = bytes | memoryview | _Span


def _verified_span(
    fut: cf.Future[tuple[int, bytes]], opened: set[int], where: str, sha: str, raw_len: int, at: int
) -> list[Piece]:
    """A file store's chunk (read from ``at`` in its file) checked against its name, as spans of
    its open file when it is stored plain (the pages are sent from the page cache), else decoded
    (its file closed)."""
    fd, data = _downloaded(fut, where, sha)
    ranges = _raw_ranges(data, raw_len)
    if ranges is None:
        opened.discard(fd)
        os.close(fd)
        return [*_decoded_checked(data, where, sha, raw_len)]
    view = memoryview(data)
    _check([view[a:b] for a, b in ranges], where, sha, raw_len)
    return [_Span(fd, at + a, b - a) for a, b in ranges]


def _send(fd: int, parts: list[Piece]) -> None:
    for part in parts:
        if isinstance(part, _Span):
            offset, end = part.offset, part.offset + part.length
            while offset < end:
                sent = os.sendfile(fd, part.fd, offset, end - offset)
                if not sent:
                    raise StoreError("a chunk file shrank while it was being sent")
                offset += sent
        else:
            _write_all(fd, [part])


class DeferredFile:
    """A checkpoint file that a fetch left out, to be written in order while it downloads (into
    the pipe of a CRIU restoring from its page images as they arrive). Chunks are downloaded
    ``concurrency`` ahead of the writer and verified by all cores but one, so memory stays bounded
    whatever the file's size and the reader keeps a core. Recurring chunks are kept decoded in a
    temp file in ``spill_dir`` (the fetch's destination) while it streams."""

    def __init__(
        self, store: Store, job: str, cid: str, entry: _FileEntry, spill_dir: str | os.PathLike[str]
    ) -> None:
        self._store, self._job, self._cid, self._entry = store, job, cid, entry
        self._spill_dir = spill_dir
        self.size = entry.size

    def write_to(self, fd: int, progress: Callable[[int], None] | None = None) -> None:
        """Write the data into ``fd``, each chunk verified before any of it is written. A damaged
        chunk marks the checkpoint bad and raises CheckpointUnusable: what was written is cut
        short, never wrong. Downloads stop as soon as this returns or raises (the reader gone)."""
        report = _Progress(progress)
        with contextlib.closing(self._chunks()) as chunks:
            for parts in chunks:
                _send(fd, parts)
                report.add(sum(map(len, parts)))

    def _chunks(self) -> Iterator[list[Piece]]:
        """The data, verified, chunk by chunk; a _Span's file is open until the next is asked for.

        From a file store, a chunk stored plain (one that did not compress) is sent from its
        file. A chunk that recurs (zero or repeated pages) is fetched, verified and decoded
        once, then sent from the spill file (_Spill)."""
        store, where = self._store, f"{self._job}/{self._cid}"
        chunks = iter(self._entry.chunks)
        ahead: collections.deque[cf.Future] = collections.deque()
        opened: set[int] = set()  # chunk files open for _Spans: closed once sent, the rest at the end
        try:
            with (
                store._backend.transfers() as transfers,
                cf.ThreadPoolExecutor(_STREAM_CPU_THREADS, thread_name_prefix="mmshim-stream") as cpu,
                _Spill(self._spill_dir, self._entry.chunks) as spill,
            ):

                def next_chunk() -> None:
                    for sha, raw, stored in chunks:  # at most one
                        key, at = _locate(sha, self._entry.places.get(sha))
                        if isinstance(transfers, _FileTransfers) and stored >= raw:
                            got = transfers.open(key, opened, at, stored)
                            ahead.append(cpu.submit(_verified_span, got, opened, where, sha, raw, at or 0))
                        elif (spilled := spill.get(sha)) is not None:
                            ahead.append(spilled)
                        else:
                            got = transfers.get(key, stored, at)
                            ahead.append(spill.verify(cpu, got, where, sha, raw))
                        return

                try:
                    for _ in range(store.concurrency):
                        next_chunk()
                    while ahead:
                        parts = ahead.popleft().result()
                        next_chunk()
                        yield parts
                        for fd in {p.fd for p in parts if isinstance(p, _Span)} & opened:
                            opened.discard(fd)
                            os.close(fd)
                except CheckpointUnusable as e:
                    store._mark_bad(self._job, self._cid, str(e))
                    raise
                finally:
                    cpu.shutdown(cancel_futures=True)
        finally:  # the transfers are done: no file opens any more
            for fd in opened:
                os.close(fd)


class _Spill:
    """Chunks of a streamed file that recur in it, verified and decoded once, written into a temp
    file beside the restore's images, and sent from there (sendfile) at every occurrence.

    Text memory repeats a few dozen chunks in a cycle: decoding each occurrence cost 0.5 s of CPU
    per 2 GiB here, on the core CRIU needs. A file, not memory: its page cache is written back
    and reclaimed under pressure on a host that is filling with the restored job. Up to
    _SPILL_BUDGET bytes; past it, or after a failed write (a full disk, logged), a recurring chunk
    is fetched and verified again at each occurrence: slower, never wrong. Its slots are written
    once, before the future that names them completes."""

    def __init__(self, directory: str | os.PathLike[str], chunks: list[tuple[str, int, int]]) -> None:
        counts = collections.Counter(sha for sha, _, _ in chunks)
        self._recurring = {sha for sha, n in counts.items() if n > 1}
        self._directory = directory
        self._spilled: dict[str, cf.Future[list[Piece]]] = {}
        self._room, self._end = _SPILL_BUDGET, 0
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> _Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def get(self, sha: str) -> cf.Future[list[Piece]] | None:
        """The spilled chunk's future: its slot, or its data if the spill failed."""
        return self._spilled.get(sha)

    def verify(
        self, cpu: cf.Executor, got: cf.Future[bytes], where: str, sha: str, raw: int
    ) -> cf.Future[list[Piece]]:
        """A downloaded chunk verified (and decoded) on ``cpu``; a recurring one also spilled,
        if there is room, and handed to its later occurrences (get)."""
        with self._lock:  # registered before _spill can fail and unregister it
            if sha not in self._recurring or self._room < raw:
                return cpu.submit(_verified, got, where, sha, raw)
            self._room -= raw
            self._spilled[sha] = fut = cpu.submit(self._spill, got, where, sha, raw)
            return fut

    def _spill(self, got: cf.Future[bytes], where: str, sha: str, raw: int) -> list[Piece]:
        parts = _verified(got, where, sha, raw)
        try:
            with self._lock:
                if self._file is None:
                    self._file = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115 (__exit__)
                offset, self._end = self._end, self._end + raw
            _pwrite_all(self._file.fileno(), parts, offset)
        except OSError as e:
            with self._lock:
                if self._room:
                    log.warning("cannot spill chunks into %s (%s): fetching them again", self._directory, e)
                self._room = 0
                del self._spilled[sha]  # later occurrences fetch it again: memory stays bounded
            return parts
        return [_Span(self._file.fileno(), offset, raw)]


class Store:
    """A checkpoint repository; see the module docstring for the format and its guarantees."""

    def __init__(
        self,
        backend: _Backend,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
    ) -> None:
        self._backend = backend
        self.url = backend.url
        self.chunk_size = chunk_size
        self.concurrency = concurrency
        self.compression_level = compression_level
        self.grace_seconds = grace_seconds  # what gc is run with; decides which chunks a save may reuse
        self._clock: Callable[[], float] = time.time
        self._local = threading.local()
        self._digest_lock = threading.Lock()
        self._digest_backlog: dict[str, list[Callable[[dict[str, Any]], bool]]] = {}

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------

    def _scan(self, job: str) -> tuple[list[str], set[str]]:
        """Manifest ids (newest first) and bad ids of a job, from one listing.

        Keys come sorted: bad/ < checkpoints/ < events/ < inflight/, so the listing stops at the
        first key past checkpoints/ and usually costs one request however long the history.
        """
        base = _job_prefix(job)
        manifests: list[str] = []
        bad: set[str] = set()
        for obj in self._backend.list(base):
            rel = obj.key[len(base) :]
            if rel.startswith("bad/"):
                if _CID_RE.fullmatch(rel[4:]):
                    bad.add(rel[4:])
            elif rel.startswith("checkpoints/"):
                name = rel[len("checkpoints/") :]
                if name.endswith(".json") and _CID_RE.fullmatch(name[:-5]):
                    manifests.append(name[:-5])
            elif rel > "checkpoints/":
                break
        return sorted(manifests, reverse=True), bad

    def _read_manifest(self, job: str, cid: str) -> tuple[dict[str, Any], list[_FileEntry]]:
        """The verified manifest; _NotFound if gone, CheckpointUnusable if damaged."""
        data = self._backend.get(_manifest_key(job, cid))
        where = f"{job}/{cid}"
        doc = _decode_manifest(data, where)
        if doc.get("job_id") != job or doc.get("checkpoint_id") != cid:
            raise CheckpointUnusable(f"manifest {where} names another checkpoint")
        return doc, _manifest_files(doc, where, job)

    def _info(self, job: str, cid: str, doc: dict[str, Any] | None, state: str) -> CheckpointInfo:
        if doc is None:
            return CheckpointInfo(job, cid, _checkpoint_time(cid), 0, 0, state, {})
        meta = doc.get("meta")
        return CheckpointInfo(
            job,
            cid,
            float(doc.get("created") or _checkpoint_time(cid)),
            int(doc.get("size") or 0),
            int(doc.get("stored") or 0),
            state,
            meta if isinstance(meta, dict) else {},
        )

    def _mark_bad(self, job: str, cid: str, reason: str) -> None:
        """Record why a checkpoint is unusable; failing to record it must not hide the reason."""
        log.warning("checkpoint %s/%s is unusable, marking it bad: %s", job, cid, reason)
        doc = {"reason": reason, "time": self._clock(), "host": socket.gethostname()}
        try:
            self._backend.put(_bad_key(job, cid), _json_bytes(doc))
        except StoreError as e:
            log.error("could not mark checkpoint %s/%s bad: %s", job, cid, e)
            return
        self._update_digest(job, lambda d: digest.mark_bad(d, cid))

    def checkpoints(self, job_id: str) -> list[CheckpointInfo]:
        """All checkpoints of a job, newest first; damaged ones show as "bad" (not marked here)."""
        job = validate_job_id(job_id)
        cids, bad = self._scan(job)
        out = []
        for cid in cids:
            try:
                doc, _ = self._read_manifest(job, cid)
            except _NotFound:
                continue
            except CheckpointUnusable:
                out.append(self._info(job, cid, None, "bad"))
                continue
            out.append(self._info(job, cid, doc, "bad" if cid in bad else "good"))
        return out

    def jobs(self) -> list[str]:
        return [j for j in self._backend.list_dirs("jobs/") if _JOB_RE.fullmatch(j) and ".." not in j]

    def chunks_of(self, job_id: str, checkpoint_id: str, name: str) -> list[Chunk]:
        """The chunks of one file of a checkpoint, in order; [] if it has no such file."""
        job = validate_job_id(job_id)
        try:
            _, files = self._read_manifest(job, checkpoint_id)
        except _NotFound:
            raise StoreError(f"checkpoint {job}/{checkpoint_id} does not exist") from None
        return next((f.chunks for f in files if f.name == name), [])

    def latest_good(self, job_id: str) -> CheckpointInfo | None:
        """Newest checkpoint not marked bad whose manifest verifies: one listing and one GET."""
        job = validate_job_id(job_id)
        cids, bad = self._scan(job)
        for cid in cids:
            if cid in bad:
                continue
            try:
                doc, _ = self._read_manifest(job, cid)
            except _NotFound:
                continue
            except CheckpointUnusable as e:
                self._mark_bad(job, cid, str(e))
                continue
            return self._info(job, cid, doc, "good")
        return None

    # -- saving --------------------------------------------------------------------------------

    def _compress(self, raw: Raw) -> Data:
        """One zstd frame, or the raw bytes themselves (a view: no copy) where that is not smaller
        or where three 16 KiB samples do not shrink by 3% (page images of numeric data: level 1
        costs 0.45 s per GiB on them for nothing). Plain, not framed as raw blocks: a streamed
        restore then sends a chunk file's pages from page-aligned offsets, and CRIU reads them
        from its pipe faster (2 GiB of random memory here: 1.21 s against 1.39 s, medians of 6
        and 4)."""
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.compression_level)
        if len(raw) >= 4 * _SAMPLE:
            mid = len(raw) // 2
            samples = raw[:_SAMPLE] + raw[mid : mid + _SAMPLE] + raw[-_SAMPLE:]
            if len(c.compress(samples)) > 0.97 * len(samples):
                return [memoryview(raw)]
        data = c.compress(raw)
        return data if len(data) < len(raw) else [memoryview(raw)]

    def _known_chunks(self, job: str, limit: int = 3) -> tuple[dict[str, int], dict[str, Place]]:
        """Chunks of the job's newest good manifests, reused without a HEAD each: their stored
        lengths, and where the packed ones are."""
        cids, bad = self._scan(job)
        known: dict[str, int] = {}
        places: dict[str, Place] = {}
        for cid in [c for c in cids if c not in bad][:limit]:
            try:
                _, files = self._read_manifest(job, cid)
            except (_NotFound, CheckpointUnusable):
                continue
            for f in files:
                for sha, _raw, stored in f.chunks:
                    if sha not in known:  # its length and place from the same entry
                        known[sha] = stored
                        if sha in f.places:
                            places[sha] = f.places[sha]
        return known, places

    def save(
        self,
        job_id: str,
        src_dir: str | os.PathLike[str],
        meta: dict[str, Any],
        done: threading.Event | None = None,
        progress: Callable[[int], None] | None = None,
        abort: threading.Event | None = None,
        gate: Gate | None = None,
        reuse: dict[str, dict[int, Chunk]] | None = None,
        release: bool = False,
        borrowed: Mapping[str, Borrowed] | None = None,
    ) -> CheckpointInfo:
        """Store the regular files under src_dir as a new checkpoint; the manifest goes last.

        With ``done``, files may still be growing (append-only, as CRIU writes them): full chunks
        are stored as they appear and the tails once ``done`` is set, so dump and upload overlap.
        ``abort`` set by then (the dump that was feeding the files failed) means no manifest.
        With ``gate``, chunks are read, hashed and compressed as they appear but written only
        once the caller opens it, which it must do (the save waits for it).
        ``progress`` gets the running total of raw bytes processed. Symlinks, special files and
        empty directories are not stored. Nothing else is changed (no retention).
        ``reuse`` names, per file, chunks (by index) that the caller knows to hold that part of
        the file, taken from this job's last checkpoint (chunks_of): they are not read (the file
        may have a hole there). One that none of the job's newest good checkpoints names fails
        the save, as nothing would then keep gc from deleting it.
        ``release``: src_dir is the caller's scratch, each chunk's range is punched out of its
        file once stored (_release); what it holds afterwards is undefined. A file store on the
        same file system takes a file whose new full chunks did not compress whole, as a pack
        (the module docstring), and keeps those chunks in it.
        ``borrowed`` names, per file, ranges whose data is read from elsewhere (Borrowed); its
        check() failing fails the save.
        """
        job = validate_job_id(job_id)
        if not isinstance(meta, dict):
            raise StoreError(f"meta must be a dict, not {type(meta).__name__}")
        _json_bytes(meta)  # fail before writing anything
        borrowed = borrowed or {}
        src = Path(src_dir)
        if not src.is_dir():
            raise StoreError(f"cannot save {src}: not a directory")
        started = self._clock()
        t0 = time.monotonic()
        cid = _new_checkpoint_id(started)
        known = self._known_chunks(job)
        packs = f"{_pack_key(job, cid)}-"
        marker = {"created": started, "host": socket.gethostname(), "pid": os.getpid()}
        self._backend.put(_inflight_key(job, cid), _json_bytes(marker))
        _fault("inflight_written")
        try:
            ctx, files = self._save_tree(
                src, known, packs, done, _Progress(progress), gate, reuse or {}, borrowed, release
            )
            for lender in borrowed.values():
                lender.check()
            chunks = [[[sha, n, ctx.sizes[sha], *ctx.pack_fields(sha)] for sha, n in f.chunks] for f in files]
            doc = {
                "format": FORMAT_PACKED if any(len(c) == 5 for cs in chunks for c in cs) else FORMAT,
                "job_id": job,
                "checkpoint_id": cid,
                "created": started,
                "chunk_size": self.chunk_size,
                "compression": "zstd",
                "size": sum(f.offset for f in files),
                "stored": ctx.stored,
                "meta": meta,
                "files": [
                    {"name": f.name, "size": f.offset, "mode": f.mode, "chunks": c}
                    for f, c in zip(files, chunks, strict=True)
                ],
            }
            _fault("before_manifest")
            if abort is not None and abort.is_set():
                raise StoreError(f"checkpoint {job}/{cid} aborted: its source failed")
            self._backend.put(_manifest_key(job, cid), encode_manifest(doc), bulk=True)
            _fault("manifest_written")
        except BaseException as e:
            try:
                self._backend.delete([_inflight_key(job, cid)])
            except StoreError as e2:
                log.warning("could not remove in-flight marker of %s/%s: %s", job, cid, e2)
            if isinstance(e, Exception) and not isinstance(e, StoreError):
                raise StoreError(f"saving checkpoint {job}/{cid} failed: {type(e).__name__}: {e}") from e
            raise
        try:
            self._backend.delete([_inflight_key(job, cid)])
        except StoreError as e:  # the checkpoint is complete; the marker only delays gc
            log.warning("checkpoint %s/%s saved, but its in-flight marker stays: %s", job, cid, e)
        info = self._info(job, cid, doc, "good")
        self._update_digest(job, lambda d: digest.set_checkpoint(d, cid, info))
        log.info(
            "saved checkpoint %s/%s: %d files, %d bytes, %d bytes written in %d new chunks, %.1fs",
            job, cid, len(files), info.size, info.stored, ctx.written, time.monotonic() - t0,
        )  # fmt: skip
        return info

    def _walk(self, src: Path) -> list[tuple[str, str]]:
        """(name, path) of the regular files under src, sorted; others skipped with a warning."""
        out = []
        for dirpath, dirs, files in os.walk(src):
            dirs.sort()
            for fname in files:
                path = os.path.join(dirpath, fname)
                name = Path(path).relative_to(src).as_posix()
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    log.warning("not saving %s: not a regular file", path)
                    continue
                try:
                    _check_name(name)
                except CheckpointUnusable as e:
                    raise StoreError(f"cannot save {path}: {e}") from None
                out.append((name, path))
        return sorted(out)

    def _save_tree(
        self,
        src: Path,
        known: tuple[dict[str, int], dict[str, Place]],
        packs: str,
        done: threading.Event | None,
        progress: _Progress,
        gate: Gate | None,
        reuse: dict[str, dict[int, Chunk]],
        borrowed: Mapping[str, Borrowed],
        release: bool,
    ) -> tuple[_Save, list[_SrcFile]]:
        """Read the tree in chunk-size pieces, re-scanning until done; workers do the rest."""
        state: dict[str, _SrcFile] = {}
        with (
            self._backend.transfers() as transfers,
            cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="mmshim-store-cpu") as cpu,
        ):
            if gate is None:
                gate = Gate()
                gate.open()
            limit = 2 * self.concurrency * self.chunk_size
            ctx = _Save(transfers, known, limit, progress, gate, release, packs)
            try:
                while ctx.pipe.error is None:
                    final = done is None or done.is_set()  # read before the pass: it sees final sizes
                    self._save_pass(src, state, final, ctx, cpu, reuse, borrowed)
                    if final:
                        break
                    done.wait(POLL_SECONDS)  # type: ignore[union-attr]
            except BaseException as e:
                ctx.pipe.error = ctx.pipe.error or e
            ctx.pipe.join()
            transfers.durable()
        return ctx, [state[n] for n in sorted(state)]

    def _save_pass(
        self,
        src: Path,
        state: dict[str, _SrcFile],
        final: bool,
        ctx: _Save,
        cpu: cf.Executor,
        reuse: dict[str, dict[int, Chunk]],
        borrowed: Mapping[str, Borrowed],
    ) -> None:
        seen = set()
        for name, path in self._walk(src):
            seen.add(name)
            f = state.setdefault(name, _SrcFile(name))
            try:
                fd = os.open(path, (os.O_RDWR if ctx.release else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                seen.discard(name)
                continue
            except OSError as e:
                raise StoreError(f"cannot read {path}: {e.strerror or e}") from e
            try:
                st = os.fstat(fd)
                f.mode = stat.S_IMODE(st.st_mode) & MODE_MASK
                if st.st_size < f.offset:
                    raise StoreError(f"{path} shrank while it was being saved (files must only grow)")
                end = (
                    st.st_size
                    if final
                    else f.offset + (st.st_size - f.offset) // self.chunk_size * self.chunk_size
                )
                while f.offset < end:
                    n = min(self.chunk_size, end - f.offset)
                    if (chunk := reuse.get(name, {}).get(f.offset // self.chunk_size)) is not None:
                        f.chunks.append(ctx.reuse(chunk, n, f"{name} at {f.offset}"))
                        f.offset += n
                        continue
                    if not ctx.pipe.start(n):
                        return
                    try:
                        raw = _chunk(fd, n, f.offset, ctx.release, borrowed.get(name), path)
                        entry: list[Any] = [None, n]
                        f.chunks.append(entry)
                        adopt = ctx.adopt is not None and n == self.chunk_size and name not in borrowed
                        cpu.submit(self._save_chunk, ctx, entry, raw, (f, path, f.offset) if adopt else None)
                    except BaseException as e:
                        ctx.pipe.finish(e, n)
                        raise
                    f.offset += n
            finally:
                os.close(fd)
        if final:
            gone = [n for n in state if n not in seen]
            if gone:
                raise StoreError(f"{', '.join(gone)} disappeared from {src} while it was being saved")

    def _save_chunk(
        self, ctx: _Save, entry: list[Any], raw: Raw, source: tuple[_SrcFile, str, int] | None
    ) -> None:
        """Hash, dedup, compress, upload one chunk (worker thread); finishes its pipeline slot.
        A ``source`` (file, path, offset) may keep a chunk stored plain where it is (_keep)."""
        weight = len(raw)
        try:
            sha = chunk_hash(raw)
            entry[0] = sha
            if ctx.claim(sha):
                key = _chunk_key(sha)
                obj = self._backend.head(key)
                if obj is not None and self._clock() - obj.mtime < self.grace_seconds / 2:
                    ctx.sizes[sha] = obj.size  # young enough that no gc can delete it now
                else:
                    data = self._compress(raw)
                    size = sum(map(len, data)) if isinstance(data, list) else len(data)
                    ctx.sizes[sha] = size
                    if source is not None and size == len(raw) and self._keep(ctx, sha, *source):
                        ctx.pipe.shrink(weight)  # its bytes stay in the file: it holds no memory
                        ctx.gate.call(functools.partial(self._chunk_kept, ctx, source[1], source[2], size))
                        return
                    kept = _weight(len(raw), size)
                    ctx.pipe.shrink(weight - kept)  # raw is freed: data is kept
                    weight = kept
                    ctx.gate.call(functools.partial(self._write_chunk, ctx, key, data, raw, size))
                    return
            if ctx.release:
                _release(raw)
            ctx.progress.add(len(raw))
            ctx.pipe.finish(weight=weight)
        except BaseException as e:
            ctx.pipe.finish(e, weight)

    def _write_chunk(self, ctx: _Save, key: str, data: Data, raw: Raw, stored: int) -> None:
        """Hand a chunk to the transfers; whatever happens finishes its pipeline slot (this may run
        in the thread that opened the gate, which must not get the error)."""
        try:
            fut = ctx.transfers.put(key, data)
        except BaseException as e:
            ctx.pipe.finish(e, _weight(len(raw), stored))
            return
        fut.add_done_callback(functools.partial(self._chunk_written, ctx, raw, stored))

    def _chunk_written(self, ctx: _Save, raw: Raw, stored: int, fut: cf.Future[None]) -> None:
        error = fut.exception()
        if error is None and ctx.release:  # data (or a view of raw, stored plain) is written
            _release(raw)
        self._count(ctx, len(raw), stored, _weight(len(raw), stored), error)

    def _keep(self, ctx: _Save, sha: str, f: _SrcFile, path: str, offset: int) -> bool:
        """Make the chunk at ``offset`` of the caller's scratch file part of a pack: the whole
        file becomes one when the first of its chunks stays (see the module docstring)."""
        with ctx.lock:
            if f.pack is None and f.adoptable and ctx.adopt is not None:
                key = f"{ctx.packs}{ctx.npacks}"
                f.adoptable = ctx.adopt(path, key)
                if f.adoptable:
                    f.pack, ctx.npacks = key, ctx.npacks + 1
            if f.pack is None:
                return False
            ctx.places[sha] = (f.pack, offset)
            return True

    def _chunk_kept(self, ctx: _Save, path: str, offset: int, size: int) -> None:
        """A chunk kept in its pack: its writeback started and counted. Publishing the pack
        fsyncs it, which waits for the writeback and reports what failed."""
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc.start_writeback(fd, offset, size)
            finally:
                os.close(fd)
        self._count(ctx, size, size, 0)

    def _count(
        self, ctx: _Save, raw_len: int, stored: int, weight: int, error: BaseException | None = None
    ) -> None:
        """A chunk in the store (or failed): counted, reported, its pipeline slot finished."""
        if error is None:
            with ctx.lock:
                ctx.stored += stored
                ctx.written += 1
                count = ctx.written
            try:
                _fault("chunk_written", count=count)
                ctx.progress.add(raw_len)
            except BaseException as e:
                error = e
        ctx.pipe.finish(error, weight)

    # -- fetching ------------------------------------------------------------------------------

    def fetch(
        self,
        job_id: str,
        checkpoint_id: str,
        dest_dir: str | os.PathLike[str],
        progress: Callable[[int], None] | None = None,
        defer: Callable[[str], bool] | None = None,
    ) -> CheckpointInfo:
        """Write the checkpoint's files into dest_dir, verifying every chunk.

        Files whose name ``defer`` accepts are not written: they are in the result's ``deferred``,
        to be streamed later. On any failure the files this call wrote (created or overwrote) are
        removed again. A damaged checkpoint is marked bad and CheckpointUnusable raised. Other
        failures (S3 unreachable) raise StoreError and mark nothing: the checkpoint may be fine.
        """
        job = validate_job_id(job_id)
        cid = _check_checkpoint_id(checkpoint_id)
        return self._fetch(job, cid, dest_dir, progress, check_bad=True, defer=defer)

    def _fetch(
        self,
        job: str,
        cid: str,
        dest_dir: str | os.PathLike[str],
        progress: Callable[[int], None] | None,
        check_bad: bool,
        defer: Callable[[str], bool] | None = None,
    ) -> CheckpointInfo:
        where = f"{job}/{cid}"
        if check_bad:
            try:
                marker = self._backend.get(_bad_key(job, cid))
            except _NotFound:
                pass
            else:
                raise CheckpointUnusable(f"checkpoint {where} is marked bad: {_reason(marker)}")
        try:
            doc, files = self._read_manifest(job, cid)
        except _NotFound:
            raise CheckpointUnusable(f"job {job} has no checkpoint {cid}") from None
        except CheckpointUnusable as e:
            self._mark_bad(job, cid, str(e))
            raise
        deferred = {
            f.name: DeferredFile(self, job, cid, f, dest_dir) for f in files if defer and defer(f.name)
        }
        files = [f for f in files if f.name not in deferred]
        writer = _TreeWriter(dest_dir)
        try:
            self._fetch_files(files, writer, _Progress(progress), where)
            for f, fd in zip(files, writer.fds, strict=True):
                os.fchmod(fd, f.mode)
        except CheckpointUnusable as e:
            writer.rollback()
            self._mark_bad(job, cid, str(e))
            raise
        except OSError as e:
            writer.rollback()
            raise StoreError(f"cannot restore checkpoint {where} into {writer.root}: {e}") from e
        except BaseException:
            writer.rollback()
            raise
        finally:
            writer.close()
        log.info(
            "fetched checkpoint %s into %s (%d files, %d deferred, %s bytes in all)",
            where,
            writer.root,
            len(files),
            len(deferred),
            doc["size"],
        )
        info = self._info(job, cid, doc, "good")
        info.deferred = deferred
        return info

    def _fetch_files(
        self, files: list[_FileEntry], writer: _TreeWriter, progress: _Progress, where: str
    ) -> None:
        # Each distinct chunk is downloaded once and written wherever it occurs (zero pages...).
        wanted: dict[str, tuple[int, int, Place | None, list[tuple[int, int]]]] = {}
        for f in files:
            fd = writer.create(f.name, f.size)
            offset = 0
            for sha, raw, stored in f.chunks:
                wanted.setdefault(sha, (raw, stored, f.places.get(sha), []))[3].append((fd, offset))
                offset += raw
        with (
            self._backend.transfers() as transfers,
            cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="mmshim-store-cpu") as cpu,
        ):
            pipe = _Pipeline(2 * self.concurrency)
            for sha, (raw, stored, place, targets) in wanted.items():
                if not pipe.start():
                    break
                try:
                    key, at = _locate(sha, place)
                    fut = transfers.get(key, stored, at)
                    fut.add_done_callback(
                        functools.partial(self._chunk_fetched, cpu, pipe, progress, where, sha, raw, targets)
                    )
                except BaseException as e:
                    pipe.finish(e)
                    break
            pipe.join()

    def _chunk_fetched(self, cpu: cf.Executor, pipe: _Pipeline, *args: Any) -> None:
        """Hand a downloaded chunk to a CPU worker (runs in the transfer thread)."""
        try:
            cpu.submit(self._verify_chunk, pipe, *args)
        except BaseException as e:
            pipe.finish(e)

    def _verify_chunk(
        self,
        pipe: _Pipeline,
        progress: _Progress,
        where: str,
        sha: str,
        raw_len: int,
        targets: list[tuple[int, int]],
        fut: cf.Future[bytes],
    ) -> None:
        try:
            parts = _verified(fut, where, sha, raw_len)
            for fd, offset in targets:
                _pwrite_all(fd, parts, offset)
                progress.add(raw_len)
            pipe.finish()
        except OSError as e:
            pipe.finish(StoreError(f"cannot write restored files: {e.strerror or e}"))
        except BaseException as e:
            pipe.finish(e)

    def fetch_latest(
        self,
        job_id: str,
        dest_dir: str | os.PathLike[str],
        progress: Callable[[int], None] | None = None,
        defer: Callable[[str], bool] | None = None,
        skip: Collection[str] = (),
    ) -> CheckpointInfo | None:
        """Fetch the newest good checkpoint, falling back past damaged ones; None if none is left.

        ``progress`` follows each attempt as in fetch (a fallback starts its count again at 0).
        Checkpoints named in ``skip`` are passed over (the caller's: not for this host, or found
        damaged where the bad mark could not be written).
        StoreError other than CheckpointUnusable (the store is unreachable) propagates: starting
        afresh then would throw work away.
        """
        job = validate_job_id(job_id)
        cids, bad = self._scan(job)
        for cid in cids:
            if cid in bad or cid in skip:
                continue
            try:
                return self._fetch(job, cid, dest_dir, progress, check_bad=False, defer=defer)
            except CheckpointUnusable as e:
                log.warning("checkpoint %s/%s unusable, trying the previous one: %s", job, cid, e)
        return None

    # -- deleting ------------------------------------------------------------------------------

    def delete(self, job_id: str, checkpoint_id: str | None = None) -> None:
        """Delete one checkpoint's manifest (and markers), or everything of a job.

        Chunks are shared and left to gc.
        """
        job = validate_job_id(job_id)
        if checkpoint_id is not None:
            cid = _check_checkpoint_id(checkpoint_id)
            self._backend.delete([_manifest_key(job, cid), _bad_key(job, cid), _inflight_key(job, cid)])
            self._update_digest(job, lambda d: digest.set_checkpoint(d, cid, None))
            return
        self._backend.delete([o.key for o in self._backend.list(_job_prefix(job))])

    def retain(self, job_id: str, keep: int = 2) -> list[str]:
        """Delete every manifest older than the newest `keep` good ones; returns the deleted ids.

        Good means not marked bad and a manifest that verifies (damaged ones get marked bad here).
        Bad checkpoints newer than the kept ones stay, for diagnosis.
        """
        job = validate_job_id(job_id)
        if keep < 1:
            raise StoreError(f"retain needs keep >= 1 (got {keep}); use delete() to remove a job")
        cids, bad = self._scan(job)
        good = 0
        doomed: list[str] = []
        for cid in cids:
            if good >= keep:
                doomed.append(cid)
            elif cid not in bad:
                try:
                    self._read_manifest(job, cid)
                    good += 1
                except _NotFound:
                    continue
                except CheckpointUnusable as e:
                    self._mark_bad(job, cid, str(e))
        if doomed:
            self._backend.delete([k for cid in doomed for k in (_manifest_key(job, cid), _bad_key(job, cid))])
            self._update_digest(job, lambda d: any([digest.set_checkpoint(d, cid, None) for cid in doomed]))
            log.info("retention for %s (keep %d): deleted %s", job, keep, ", ".join(doomed))
        return doomed

    def gc(self, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> dict[str, Any]:
        """Delete chunks and packs that no manifest references and that are older than
        grace_seconds, and punch out of older packs the ranges that none references.

        Does nothing while any save is in flight (marker younger than the grace period). Stale
        markers and temp files of crashed saves are removed too. grace_seconds must exceed the
        longest save.
        """
        now = self._clock()
        result: dict[str, Any] = {
            "in_flight": [],
            "chunks": 0,
            "referenced": 0,
            "young": 0,
            "deleted": 0,
            "deleted_bytes": 0,
            "packs": 0,
            "packs_deleted": 0,
            "pack_bytes_trimmed": 0,
            "stale_markers": 0,
            "temp_files": 0,
        }
        manifests, fresh, stale, packs = self._gc_survey(now, grace_seconds)
        if fresh:
            result["in_flight"] = fresh
            log.info("gc: saves in flight (%s), deleting nothing", ", ".join(fresh))
            return result
        referenced: set[str] = set()
        ranges: dict[str, list[tuple[int, int]]] = {}  # pack key -> (offset, length) referenced
        self._gc_references(manifests, referenced, ranges)
        candidates: list[_Obj] = []
        for obj in self._backend.list("chunks/"):
            sha = obj.key.rsplit("/", 1)[-1]
            if not _SHA_RE.fullmatch(sha):
                continue
            result["chunks"] += 1
            if sha in referenced:
                result["referenced"] += 1
            elif now - obj.mtime < grace_seconds:
                result["young"] += 1
            else:
                candidates.append(obj)
        # Look again right before deleting: a save may have started, or finished, meanwhile.
        manifests2, fresh, _, _ = self._gc_survey(now, grace_seconds)
        if fresh:
            result["in_flight"] = fresh
            log.info("gc: a save started meanwhile (%s), deleting nothing", ", ".join(fresh))
            return result
        self._gc_references(manifests2 - manifests, referenced, ranges)
        doomed = [o for o in candidates if o.key.rsplit("/", 1)[-1] not in referenced]
        old_packs = [o for o in packs if now - o.mtime >= grace_seconds]
        doomed_packs = [o for o in old_packs if o.key not in ranges]
        self._backend.delete([o.key for o in doomed + doomed_packs] + stale)
        result["deleted"] = len(doomed)
        result["deleted_bytes"] = sum(o.size for o in doomed)
        result["packs"] = len(packs)
        result["packs_deleted"] = len(doomed_packs)
        result["pack_bytes_trimmed"] = sum(
            self._backend.trim(o.key, ranges[o.key]) for o in old_packs if o.key in ranges
        )
        result["stale_markers"] = len(stale)
        result["temp_files"] = self._backend.sweep(now - grace_seconds)
        log.info("gc: %s", result)
        return result

    def _gc_survey(self, now: float, grace: float) -> tuple[set[str], list[str], list[str], list[_Obj]]:
        """Manifest keys, fresh in-flight saves ("job/cid"), stale marker keys and packs of all
        jobs."""
        manifests: set[str] = set()
        fresh: list[str] = []
        stale: list[str] = []
        packs: list[_Obj] = []
        for obj in self._backend.list("jobs/"):
            parts = obj.key.split("/")
            if len(parts) != 4:
                continue
            _, job, kind, name = parts
            if kind == "checkpoints" and name.endswith(".json"):
                manifests.add(obj.key)
            elif kind == "packs" and _PACK_RE.fullmatch(name):
                packs.append(obj)
            elif kind == "inflight":
                started = obj.mtime
                try:
                    started = max(started, float(json.loads(self._backend.get(obj.key))["created"]))
                except _NotFound:
                    continue  # the save just finished
                except (ValueError, KeyError, TypeError):
                    pass
                if now - started < grace:
                    fresh.append(f"{job}/{name}")
                else:
                    stale.append(obj.key)
        return manifests, fresh, stale, packs

    def _gc_references(
        self, manifest_keys: Iterable[str], referenced: set[str], ranges: dict[str, list[tuple[int, int]]]
    ) -> None:
        for key in sorted(manifest_keys):
            _, job, _, name = key.split("/")
            try:
                _, files = self._read_manifest(job, name[:-5])
            except _NotFound:
                continue
            except CheckpointUnusable as e:  # unrestorable anyway: its chunks may go
                log.warning("gc: ignoring damaged manifest %s: %s", key, e)
                continue
            for f in files:
                referenced.update(sha for sha, _, _ in f.chunks)
                for sha, _, stored in f.chunks:
                    if (place := f.places.get(sha)) is not None:
                        ranges.setdefault(place[0], []).append((place[1], stored))

    # -- events --------------------------------------------------------------------------------

    def put_event(self, job_id: str, event: dict[str, Any]) -> None:
        """Store a small JSON document in the job's history (and fold it into the job's digest)."""
        job = validate_job_id(job_id)
        if not isinstance(event, dict):
            raise StoreError(f"event must be a dict, not {type(event).__name__}")
        data = _json_bytes(event)
        eid = _new_event_id(self._clock())
        self._backend.put(f"jobs/{job}/events/{eid}.json", data)
        self._update_digest(job, lambda d: digest.fold(d, event, eid))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events in time order (unreadable ones skipped with a warning)."""
        return [ev for _, ev in self._events(validate_job_id(job_id))]

    def _events(self, job: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for obj in self._backend.list(f"jobs/{job}/events/"):
            name = obj.key.rsplit("/", 1)[-1]
            if not _EVENT_RE.fullmatch(name):
                continue
            try:
                doc = json.loads(self._backend.get(obj.key))
            except _NotFound:
                continue
            except ValueError as e:
                log.warning("skipping unreadable event %s: %s", obj.key, e)
                continue
            if isinstance(doc, dict):
                out.append((name[:-5], doc))
        return out

    # -- digests -------------------------------------------------------------------------------

    def digest(self, job_id: str) -> dict[str, Any] | None:
        """The job's digest (mmshim.digest), or None if it has none this code can read."""
        job = validate_job_id(job_id)
        try:  # msgspec: a viewer's first load decodes one per job, 2-3x faster than json
            doc = msgspec.json.decode(self._backend.get(_digest_key(job)))
        except _NotFound:
            return None
        except msgspec.DecodeError as e:
            log.warning("digest of %s is unreadable: %s", job, e)
            return None
        return doc if digest.usable(doc) else None

    def _rebuild_digest(self, job: str) -> dict[str, Any]:
        pairs = self._events(job)
        return digest.build((ev for _, ev in pairs), self.checkpoints(job), ids=[i for i, _ in pairs])

    def _update_digest(self, job: str, change: Callable[[dict[str, Any]], bool]) -> None:
        """Apply `change` (True if it changed the digest) until a read-back shows it applied.

        The event or manifest it reflects is already written, so a digest rebuilt from them
        holds the change. A failure is logged only (the digest is derived, the data is safe) and
        the change is kept, to be applied with this process's next change of the job's digest.
        """
        with self._digest_lock:
            changes = self._digest_backlog.setdefault(job, [])
            changes.append(change)
            try:
                for _ in range(3):
                    doc = self.digest(job)
                    if doc is None:
                        doc = self._rebuild_digest(job)
                    elif not any([c(doc) for c in changes]):
                        del self._digest_backlog[job]
                        return
                    self._backend.put(_digest_key(job), _json_bytes(doc))
                log.warning("digest of %s still changing under concurrent writers; left as is", job)
                del self._digest_backlog[job]
            except StoreError as e:
                log.warning("digest of %s not updated (%d changes kept): %s", job, len(changes), e)


# ---------------------------------------------------------------------------------------------
# Opening


_S3_OPTIONS = ("endpoint_url", "region", "profile", "sse", "kms_key_id", "storage_class")
_OPTIONS = frozenset(
    (
        *_S3_OPTIONS,
        "chunk_size",
        "concurrency",
        "compression_level",
        "grace_seconds",
        "max_attempts",
        "connect_timeout",
        "read_timeout",
    )
)


def open_store(url: str, **options: Any) -> Store:
    """Open the store at ``file:///abs/path`` (or a bare absolute path) or ``s3://bucket/prefix``.

    Options (None means default): chunk_size (bytes, multiple of 4096, default 4 MiB),
    concurrency (transfers in flight, default 8), compression_level (zstd 1-3, default 1),
    grace_seconds (the gc grace the repository runs with, default 6 h); for S3 also endpoint_url,
    region, profile, sse ("AES256" | "aws:kms"), kms_key_id, storage_class, max_attempts
    (botocore retries, default 5), connect_timeout and read_timeout (seconds). S3-only options
    are ignored by a file store, so one configuration serves both.
    """
    unknown = set(options) - _OPTIONS
    if unknown:
        raise StoreError(f"unknown store option(s): {', '.join(sorted(unknown))}")
    opts = {k: v for k, v in options.items() if v is not None}
    chunk_size = int(opts.get("chunk_size", DEFAULT_CHUNK_SIZE))
    if chunk_size < 4096 or chunk_size % 4096 or chunk_size > 256 * MiB:
        raise StoreError(f"chunk_size {chunk_size} must be a multiple of 4096 between 4 KiB and 256 MiB")
    concurrency = int(opts.get("concurrency", DEFAULT_CONCURRENCY))
    if not 1 <= concurrency <= 256:
        raise StoreError(f"concurrency {concurrency} must be between 1 and 256")
    level = int(opts.get("compression_level", DEFAULT_COMPRESSION_LEVEL))
    if not 1 <= level <= 19:
        raise StoreError(f"compression_level {level} must be between 1 and 19 (1-3 recommended)")
    store_opts = {
        "chunk_size": chunk_size,
        "concurrency": concurrency,
        "compression_level": level,
        "grace_seconds": float(opts.get("grace_seconds", DEFAULT_GRACE_SECONDS)),
    }
    if not isinstance(url, str):
        raise StoreError(f"store URL must be a string, not {type(url).__name__}")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        bucket = parsed.netloc
        if not bucket:
            raise StoreError(f"store URL {url!r} has no bucket (expected s3://bucket/prefix)")
        prefix = parsed.path.strip("/")
        if any(p in (".", "..") for p in prefix.split("/")) or "//" in prefix:
            raise StoreError(f"store URL {url!r} has an unsafe prefix")
        sse = opts.get("sse")
        if sse not in (None, "AES256", "aws:kms"):
            raise StoreError(f"sse must be 'AES256' or 'aws:kms', not {sse!r}")
        if opts.get("kms_key_id") and sse != "aws:kms":
            raise StoreError("kms_key_id needs sse='aws:kms'")
        backend: _Backend = _S3Backend(
            bucket,
            prefix + "/" if prefix else "",
            endpoint_url=opts.get("endpoint_url"),
            region=opts.get("region"),
            profile=opts.get("profile"),
            sse=sse,
            kms_key_id=opts.get("kms_key_id"),
            storage_class=opts.get("storage_class"),
            concurrency=concurrency,
            chunk_size=chunk_size,
            max_attempts=int(opts.get("max_attempts", 5)),
            connect_timeout=float(opts.get("connect_timeout", 10)),
            read_timeout=float(opts.get("read_timeout", 60)),
        )
    elif parsed.scheme == "file" or (not parsed.scheme and url.startswith("/")):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StoreError(f"store URL {url!r}: use file:///absolute/path")
        path = unquote(parsed.path) if parsed.scheme else url
        if not path.startswith("/"):
            raise StoreError(f"store URL {url!r} needs an absolute path (file:///absolute/path)")
        backend = _FileBackend(Path(os.path.normpath(path)), concurrency)
    else:
        raise StoreError(f"unsupported store URL {url!r}: use file:///absolute/path or s3://bucket/prefix")
    return Store(backend, **store_opts)

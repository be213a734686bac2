"""Tests of mmshim.store on both backends: a local directory and moto's S3 server."""

from __future__ import annotations

import contextlib
import errno
import http.server
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard

from mmshim import store as store_mod
from mmshim.store import (
    CheckpointInfo,
    CheckpointUnusable,
    InvalidJobId,
    Store,
    StoreError,
    open_store,
    validate_job_id,
)
from tests.conftest import S3_BUCKET, open_fds

REPO_ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64 * 1024
JOB = "4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@dataclass
class Repo:
    """Where a test's store lives, and how to open it (also from a subprocess)."""

    kind: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def open(self, **kw: Any) -> Store:
        return open_store(self.url, **{**self.options, **kw})


@pytest.fixture(params=["file", "s3"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repo:
    options = {"chunk_size": CHUNK, "concurrency": 4}
    if request.param == "file":
        return Repo("file", f"file://{tmp_path}/repo", options)
    endpoint = request.getfixturevalue("s3_server")
    return Repo("s3", f"s3://{S3_BUCKET}/{uuid.uuid4().hex}", {**options, "endpoint_url": endpoint})


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def stored_raw(data: bytes) -> bytes:
    """A stored chunk's raw bytes: a zstd frame decoded, anything else stored plain."""
    try:
        return zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError:
        return data


def old_raw_frame(raw: Any) -> list[bytes | memoryview]:
    """A chunk that did not compress as earlier writers stored it: a zstd frame of raw blocks
    (RFC 8878: single segment, 8-byte content size, blocks of at most 128 KiB)."""
    parts: list[bytes | memoryview] = [b"\x28\xb5\x2f\xfd\xe0", len(raw).to_bytes(8, "little")]
    view = memoryview(raw)
    for off in range(0, len(raw), 128 * 1024):
        block = view[off : off + 128 * 1024]
        last = off + 128 * 1024 >= len(raw)
        parts += [((len(block) << 3) | last).to_bytes(3, "little"), block]
    return parts


def sparse_pages(size: int, seed: int, pages: int = 24) -> bytes:
    """Mostly zero, like a CRIU page image of a lightly used heap."""
    rng = random.Random(seed)
    data = bytearray(size)
    for _ in range(pages):
        off = rng.randrange(0, size // 4096) * 4096
        data[off : off + 4096] = rng.randbytes(4096)
    return bytes(data)


def sample_files(seed: int = 1) -> dict[str, tuple[bytes, int]]:
    return {
        "criu/pages-1.img": (sparse_pages(3 * 1024 * 1024, seed), 0o644),
        "criu/core-1.img": (rand(1000, seed + 1), 0o600),
        "criu/empty.img": (b"", 0o644),
        "rootfs.tar": (rand(CHUNK, seed + 2), 0o640),  # exactly one chunk
        "mounts/0.tar": ((b"some text %d\n" % seed) * 12000, 0o644),  # several chunks and a tail
        "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
    }


def write_tree(root: Path, files: dict[str, tuple[bytes, int]]) -> Path:
    for name, (data, mode) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    return root


def read_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o777)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def all_paths(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def chunk_keys(st: Store) -> set[str]:
    return {o.key for o in st._backend.list("chunks/")}


def manifest_chunks(st: Store, job: str, cid: str) -> set[str]:
    _, files = st._read_manifest(job, cid)
    return {f"chunks/{sha[:2]}/{sha}" for f in files for sha, _, _ in f.chunks}


def inflight_keys(st: Store, job: str) -> list[str]:
    return [o.key for o in st._backend.list(f"jobs/{job}/inflight/")]


def same_info(a: CheckpointInfo, b: CheckpointInfo) -> bool:
    return (a.checkpoint_id, a.size, a.meta, a.state) == (b.checkpoint_id, b.size, b.meta, b.state)


# ---------------------------------------------------------------------------------------------
# Round trip and dedup


def test_round_trip(repo: Repo, tmp_path: Path) -> None:
    files = sample_files()
    src = write_tree(tmp_path / "src", files)
    st = repo.open()
    totals: list[int] = []
    info = st.save(JOB, src, {"step": 7, "note": "ok"}, progress=totals.append)

    raw = sum(len(d) for d, _ in files.values())
    assert info.state == "good" and info.job_id == JOB
    assert info.size == raw and info.meta == {"step": 7, "note": "ok"}
    assert 0 < info.stored < raw / 4  # zero runs dedup, text compresses
    assert totals == sorted(totals) and totals[-1] == raw

    dest = tmp_path / "dest"
    got = st.fetch(JOB, info.checkpoint_id, dest, progress=(fetched := []).append)
    assert read_tree(dest) == files
    assert fetched[-1] == raw
    assert same_info(got, info)
    assert same_info(st.latest_good(JOB), info)
    [listed] = st.checkpoints(JOB)
    assert same_info(listed, info) and abs(listed.created - info.created) < 1e-3
    assert st.jobs() == [JOB]


def test_dedup_writes_only_changed_chunks(repo: Repo, tmp_path: Path) -> None:
    files = sample_files()
    src = write_tree(tmp_path / "src", files)
    st = repo.open()
    first = st.save(JOB, src, {"n": 1})
    before = chunk_keys(st)

    with open(src / "criu/pages-1.img", "r+b") as f:  # dirty one page of one chunk
        f.seek(5 * CHUNK + 100)
        f.write(rand(300, 99))
    second = st.save(JOB, src, {"n": 2})
    after = chunk_keys(st)
    assert len(after - before) == 1
    assert 0 < second.stored <= CHUNK + 1024

    heads: list[str] = []
    real_head = st._backend.head
    st._backend.head = lambda key: heads.append(key) or real_head(key)  # type: ignore[method-assign]
    third = st.save(JOB, src, {"n": 3})  # nothing changed
    assert third.stored == 0 and chunk_keys(st) == after
    assert heads == []  # chunks of the job's previous manifests are trusted without a HEAD each

    # Another job (no manifest of its own to trust) still finds the existing chunks.
    other = repo.open().save("other-job", src, {})
    assert other.stored == 0 and chunk_keys(st) == after

    st.fetch(JOB, first.checkpoint_id, tmp_path / "d1")
    assert read_tree(tmp_path / "d1") == files
    st.fetch(JOB, second.checkpoint_id, tmp_path / "d2")
    assert read_tree(tmp_path / "d2") == read_tree(src)


def allocated(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def test_release_punches_each_stored_chunk_out_of_its_source(repo: Repo, tmp_path: Path) -> None:
    """A save with ``release`` (the engine's staging) leaves its source files their sizes but no
    data: every chunk, written (raw blocks or compressed) or already stored (this job's, another
    file's in the same save), is punched out once stored. The checkpoint holds the bytes."""
    files = sample_files()
    files["criu/pages-2.img"] = (rand(2 * CHUNK, 3) * 2 + b"tail", 0o644)  # a chunk seen twice
    src = write_tree(tmp_path / "src", files)
    st = repo.open()
    st.save(JOB, src, {})
    assert allocated(src) >= sum(len(data) for data, _ in files.values()) - 4096  # not released

    (src / "rootfs.tar").write_bytes(rand(CHUNK, 7))  # one new chunk; the rest stored already
    files["rootfs.tar"] = ((src / "rootfs.tar").read_bytes(), 0o640)
    info = st.save(JOB, src, {}, release=True)

    assert 0 < info.stored <= CHUNK + 1024
    assert allocated(src) == 0
    left = {n: len(d) for n, (d, _) in files.items()}
    if repo.kind == "file":  # its new chunk stays where it is: the file went into the store whole
        del left["rootfs.tar"]
    assert {n: len(d) for n, (d, _) in read_tree(src).items()} == left
    st.fetch(JOB, info.checkpoint_id, tmp_path / "d")
    assert read_tree(tmp_path / "d") == files


def test_release_of_a_mapping_that_cannot_punch_leaves_the_data(tmp_path: Path) -> None:
    """Releasing is only a saving: where punching fails (here a read-only mapping; also a file
    system without hole punching) the source keeps its data and the save goes on."""
    path = tmp_path / "f"
    path.write_bytes(rand(2 * 4096, 1))
    fd = os.open(path, os.O_RDONLY)
    try:
        store_mod._release(store_mod._map_chunk(fd, 2 * 4096, 0))
    finally:
        os.close(fd)
    assert path.read_bytes() == rand(2 * 4096, 1) and allocated(tmp_path) == 2 * 4096


def test_reused_chunks_are_not_read_and_must_be_the_jobs(repo: Repo, tmp_path: Path) -> None:
    """A save takes the chunks the caller names for part of a file (a layer file unchanged since
    the last checkpoint, left as a hole in the new tar) without reading it; a chunk that none of
    the job's checkpoints holds fails the save, before any manifest."""
    data = rand(3 * CHUNK + 10, 5)
    src = write_tree(tmp_path / "src", {"rootfs.tar": (data, 0o644)})
    st = repo.open()
    first = st.save(JOB, src, {})
    chunks = st.chunks_of(JOB, first.checkpoint_id, "rootfs.tar")
    assert [raw for _, raw, _ in chunks] == [CHUNK, CHUNK, CHUNK, 10]
    with open(src / "rootfs.tar", "r+b") as f:  # chunks 1 and 2 become a hole
        f.seek(CHUNK)
        f.write(bytes(2 * CHUNK))

    second = st.save(JOB, src, {}, reuse={"rootfs.tar": {1: chunks[1], 2: chunks[2]}})

    assert second.stored == 0 and st.chunks_of(JOB, second.checkpoint_id, "rootfs.tar") == chunks
    st.fetch(JOB, second.checkpoint_id, tmp_path / "d")
    assert (tmp_path / "d" / "rootfs.tar").read_bytes() == data
    foreign = repo.open().save(
        "other-job", write_tree(tmp_path / "other", {"x": (rand(CHUNK, 6), 0o644)}), {}
    )
    (alien,) = st.chunks_of("other-job", foreign.checkpoint_id, "x")
    with pytest.raises(StoreError, match="not one of this job's"):
        st.save(JOB, src, {}, reuse={"rootfs.tar": {1: alien}})
    assert [c.checkpoint_id for c in st.checkpoints(JOB)] == [second.checkpoint_id, first.checkpoint_id]
    assert st.chunks_of(JOB, first.checkpoint_id, "no-such-file") == []


@dataclass
class Lender:
    """A store.Borrowed: the extents given, a check that counts its calls or fails."""

    extents: list[tuple[int, int, int, int]]
    fail: bool = False
    checks: int = 0

    def check(self) -> None:
        self.checks += 1
        if self.fail:
            raise RuntimeError("inputs.bin changed after the resume")


def test_borrowed_ranges_are_read_from_the_lenders_files(repo: Repo, tmp_path: Path) -> None:
    """A file with holes whose data the caller names elsewhere (a layer tar, its staged inputs
    left out) is stored as if whole: the same chunks as the whole file, chunks that mix its own
    bytes and borrowed ones included; check() runs once, after the reads, and failing fails the
    save before any manifest; a lender shorter than said is an error, never zeros stored."""
    inputs, more = rand(2 * CHUNK + 777, 8), rand(CHUNK, 9)
    head, middle, tail = rand(1000, 10), rand(CHUNK - 777 - 1000, 11), rand(5000, 12)
    whole = head + inputs + middle + more + tail  # more starts at a chunk boundary, as align does
    assert len(head + inputs + middle) == 3 * CHUNK
    lender = tmp_path / "inputs.bin"
    lender.write_bytes(more + inputs)
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "rootfs.tar", "wb") as f:  # the borrowed ranges are holes
        f.write(head)
        f.seek(len(inputs), os.SEEK_CUR)
        f.write(middle)
        f.seek(len(more), os.SEEK_CUR)
        f.write(tail)
    st = repo.open()
    plain = st.save("whole", write_tree(tmp_path / "whole", {"rootfs.tar": (whole, 0o644)}), {})
    fd = os.open(lender, os.O_RDONLY)
    try:
        extents = [(1000, fd, len(more), len(inputs)), (3 * CHUNK, fd, 0, len(more))]
        ok = Lender(extents)
        info = st.save(JOB, src, {}, borrowed={"rootfs.tar": ok}, release=True)

        assert ok.checks == 1
        assert st.chunks_of(JOB, info.checkpoint_id, "rootfs.tar") == st.chunks_of(
            "whole", plain.checkpoint_id, "rootfs.tar"
        )
        st.fetch(JOB, info.checkpoint_id, tmp_path / "d")
        assert (tmp_path / "d" / "rootfs.tar").read_bytes() == whole
        with pytest.raises(StoreError, match=r"inputs\.bin changed"):
            st.save(JOB, src, {}, borrowed={"rootfs.tar": Lender(extents, fail=True)})
        os.truncate(lender, len(more) + CHUNK)
        with pytest.raises(StoreError, match=r"the data .*rootfs\.tar borrows shrank"):
            st.save(JOB, src, {}, borrowed={"rootfs.tar": Lender(extents)})
    finally:
        os.close(fd)
    assert [c.checkpoint_id for c in st.checkpoints(JOB)] == [info.checkpoint_id]
    assert inflight_keys(st, JOB) == []


def test_a_lender_written_to_mid_save_never_leaves_a_chunk_unlike_its_name(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job writes to a borrowed file between the hashing and the compression of a chunk of
    it: the stored chunk is still the bytes its name is the hash of (read, not mapped), and the
    save fails on check(). A chunk unlike its name would be taken as stored by later saves."""
    lender = tmp_path / "inputs.bin"
    lender.write_bytes(rand(2 * CHUNK, 13))
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "rootfs.tar", "wb") as f:  # all of it borrowed: a hole
        f.truncate(2 * CHUNK)
    st = repo.open()
    hashed = store_mod.chunk_hash

    def job_writes_after_the_hash(raw: Any) -> str:
        sha = hashed(raw)
        with open(lender, "r+b") as f:  # the job, running again
            f.write(rand(CHUNK, 14))
        return sha

    monkeypatch.setattr(store_mod, "chunk_hash", job_writes_after_the_hash)
    fd = os.open(lender, os.O_RDONLY)
    try:
        with pytest.raises(StoreError, match="changed"):
            st.save(JOB, src, {}, borrowed={"rootfs.tar": Lender([(0, fd, 0, 2 * CHUNK)], fail=True)})
    finally:
        os.close(fd)
    monkeypatch.undo()
    keys = chunk_keys(st)
    assert keys and st.checkpoints(JOB) == []
    for key in keys:
        assert key.endswith(store_mod.chunk_hash(stored_raw(st._backend.get(key))))


def test_incompressible_chunks_are_stored_plain_and_text_compressed(repo: Repo, tmp_path: Path) -> None:
    """Random pages skip the compressor and are stored as they are (page-aligned in a chunk
    file, for a restore to send from it), as is a chunk too small to sample whose zstd frame is
    not smaller; text is compressed. All are verified and restored alike."""
    text = b"the same line\n" * 20000
    files = {PAGES: (rand(3 * CHUNK, 5), 0o600), "text": (text, 0o644), "small": (rand(1000, 6), 0o644)}
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "src", files), {})
    _, entries = st._read_manifest(JOB, info.checkpoint_id)
    by_name = {f.name: f.chunks for f in entries}
    for name, at in ((PAGES, CHUNK), ("small", 0)):
        sha, raw_len, stored = by_name[name][at // CHUNK]
        assert stored == raw_len
        assert st._backend.get(f"chunks/{sha[:2]}/{sha}") == files[name][0][at : at + raw_len]
    assert all(stored < raw_len // 10 for _, raw_len, stored in by_name["text"])
    st.fetch(JOB, info.checkpoint_id, tmp_path / "dest")
    assert read_tree(tmp_path / "dest") == files


def test_chunks_an_earlier_writer_framed_as_raw_blocks_are_still_read(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store written before chunks were kept plain: its raw-block frames are fetched and
    streamed (from their files, in place) as before, and a new checkpoint reuses them."""
    files = with_mixed_pages(1)
    st = repo.open()
    monkeypatch.setattr(store_mod.Store, "_compress", lambda self, raw: old_raw_frame(raw))
    old = st.save(JOB, write_tree(tmp_path / "src", files), {})
    monkeypatch.undo()
    _, entries = st._read_manifest(JOB, old.checkpoint_id)
    assert all(stored == raw_len + 13 + 3 for f in entries for _, raw_len, stored in f.chunks if raw_len)
    new = st.save(JOB, write_tree(tmp_path / "src", files), {})
    assert new.stored == 0
    for info in (old, new):
        dest = tmp_path / info.checkpoint_id
        got = st.fetch(JOB, info.checkpoint_id, dest, defer=PAGES.__eq__)
        assert drain(got.deferred[PAGES]) == (files[PAGES][0], None)
        st.fetch(JOB, info.checkpoint_id, dest)
        assert read_tree(dest) == files


def test_growing_files_overlap_dump_and_upload(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "criu").mkdir(parents=True)
    data = rand(10 * CHUNK + 777, 5)
    done = threading.Event()
    totals: list[int] = []
    overlap: list[int] = []

    def writer() -> None:
        with open(src / "criu/pages-1.img", "wb") as f:
            f.write(data[: 4 * CHUNK])
            f.flush()
            deadline = time.monotonic() + 30
            while (not totals or totals[-1] < 2 * CHUNK) and time.monotonic() < deadline:
                time.sleep(0.01)
            overlap.append(totals[-1] if totals else 0)
            for i in range(4 * CHUNK, len(data), 10_000):
                f.write(data[i : i + 10_000])
                f.flush()
                if i % 7 == 0:
                    time.sleep(0.001)
        (src / "criu/late.img").write_bytes(b"written last")
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    info = repo.open().save(JOB, src, {}, done=done, progress=totals.append)
    t.join()
    assert overlap[0] >= 2 * CHUNK, "nothing was stored before done was set"
    assert info.size == len(data) + len(b"written last")
    dest = tmp_path / "dest"
    repo.open().fetch(JOB, info.checkpoint_id, dest)
    assert (dest / "criu/pages-1.img").read_bytes() == data
    assert (dest / "criu/late.img").read_bytes() == b"written last"


@pytest.mark.parametrize("compressible", [False, True])
def test_gate_holds_chunk_writes_until_opened(repo: Repo, tmp_path: Path, compressible: bool) -> None:
    """Chunks are hashed while the source grows but written only once the gate opens. Held
    chunks count in the save's memory bound by what they hold: incompressible ones stop the
    reading at 2 x concurrency (the save waits, and opening the gate from another thread releases
    them), compressed ones hold little, so the whole file is read and hashed meanwhile."""
    src = tmp_path / "src"
    (src / "criu").mkdir(parents=True)
    if compressible:
        n = 40
        data = b"".join((b"chunk %d " % i * CHUNK)[:CHUNK] for i in range(n)) + b"tail!"
    else:
        n = 8
        data = rand(12 * CHUNK + 5, 11)  # more full chunks than the bound (2 x concurrency 4)
    (src / "criu/pages-1.img").write_bytes(data)
    all_held, held = threading.Event(), itertools.count(1)

    class Counting(store_mod.Gate):
        def call(self, write: Callable[[], None]) -> None:
            super().call(write)
            if next(held) == n:
                all_held.set()

    gate, done, totals, result = Counting(), threading.Event(), [], {}
    st = repo.open()

    def save() -> None:
        try:
            result["info"] = st.save(JOB, src, {}, done=done, progress=totals.append, gate=gate)
        except BaseException as e:
            result["error"] = e

    saver = threading.Thread(target=save)
    saver.start()
    try:
        assert all_held.wait(60), "the chunks never reached the gate"
        assert chunk_keys(st) == set() and totals == [], "a chunk was written through a closed gate"
    finally:
        done.set()
        gate.open()
        saver.join(60)
    assert not saver.is_alive() and "error" not in result, result
    dest = tmp_path / "dest"
    repo.open().fetch(JOB, result["info"].checkpoint_id, dest)
    assert (dest / "criu/pages-1.img").read_bytes() == data


def test_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader never holds more than 2 x concurrency chunks' bytes in flight."""
    src = write_tree(tmp_path / "src", {"big": (rand(40 * CHUNK, 3), 0o644)})
    peak = [0]
    real_start, real_put = store_mod._Pipeline.start, store_mod._FileBackend.put

    def start(self: store_mod._Pipeline, weight: int = 1) -> bool:
        ok = real_start(self, weight)
        peak[0] = max(peak[0], self._used)
        return ok

    def slow_put(self: store_mod._FileBackend, key: str, data: bytes, *, bulk: bool = False) -> None:
        time.sleep(0.005)
        real_put(self, key, data, bulk=bulk)

    monkeypatch.setattr(store_mod._Pipeline, "start", start)
    monkeypatch.setattr(store_mod._FileBackend, "put", slow_put)
    st = open_store(f"file://{tmp_path}/repo", chunk_size=CHUNK, concurrency=2)
    st.save(JOB, src, {})
    assert peak[0] == 4 * CHUNK


# ---------------------------------------------------------------------------------------------
# Packs: a file store takes the caller's scratch files whole (save's ``release``)


def packed_pages(seed: int) -> bytes:
    """Three chunks of random pages, one of text, and a short random tail."""
    return rand(3 * CHUNK, seed) + cycled_text(1, 1)[:CHUNK] + rand(CHUNK // 2, seed + 1)


def pack_paths(repo: Repo) -> list[Path]:
    return sorted(Path(repo.url[len("file://") :]).glob("jobs/*/packs/*"))


def file_repo(tmp_path: Path) -> Repo:
    return Repo("file", f"file://{tmp_path}/repo", {"chunk_size": CHUNK, "concurrency": 4})


def test_a_release_save_keeps_new_incompressible_chunks_in_their_file_as_a_pack(tmp_path: Path) -> None:
    """The three random chunks stay where they are and the file goes into the store whole (no
    copy); the text chunk is compressed and the short tail stored plain as chunk objects, both
    punched out of the pack. Fetched and streamed alike; a second save of the same data names
    the first one's pack and adopts nothing."""
    repo = file_repo(tmp_path)
    st = repo.open()
    files = {PAGES: (packed_pages(1), 0o644), "criu/core-1.img": (b"core", 0o600)}
    src = write_tree(tmp_path / "src", files)
    info = st.save(JOB, src, {}, release=True)

    doc, [core, pages] = st._read_manifest(JOB, info.checkpoint_id)
    assert doc["format"] == store_mod.FORMAT_PACKED
    [pack] = pack_paths(repo)
    assert pack.name == f"{info.checkpoint_id}-0" and pack.stat().st_size == len(files[PAGES][0])
    key = f"jobs/{JOB}/packs/{pack.name}"
    assert [pages.places.get(sha) for sha, _, _ in pages.chunks] == [
        (key, 0), (key, CHUNK), (key, 2 * CHUNK), None, None
    ]  # fmt: skip
    assert not core.places
    assert pack.stat().st_blocks * 512 == 3 * CHUNK  # the text and the tail were punched out
    assert not (src / PAGES).exists() and (src / "criu/core-1.img").exists()
    assert (
        info.stored == 3 * CHUNK + CHUNK // 2 + sum(s for sha, _, s in pages.chunks[3:4]) + core.chunks[0][2]
    )

    st.fetch(JOB, info.checkpoint_id, tmp_path / "d")
    assert read_tree(tmp_path / "d") == files
    got = st.fetch(JOB, info.checkpoint_id, tmp_path / "s", defer=PAGES.__eq__)
    assert drain(got.deferred[PAGES]) == (files[PAGES][0], None)

    src2 = write_tree(tmp_path / "src2", files)
    again = st.save(JOB, src2, {}, release=True)
    assert again.stored == 0 and pack_paths(repo) == [pack]
    _, [_, pages2] = st._read_manifest(JOB, again.checkpoint_id)
    assert pages2.places == pages.places
    assert (src2 / PAGES).exists() and allocated(src2) == 0  # all stored already: released
    st.fetch(JOB, again.checkpoint_id, tmp_path / "d2")
    assert read_tree(tmp_path / "d2") == files


def test_a_save_without_release_or_from_another_file_system_copies(repo: Repo, tmp_path: Path) -> None:
    """Only a file store, only the caller's scratch, only on the store's file system: anything
    else is copied into chunk objects as before (manifest format 2)."""
    files = {PAGES: (packed_pages(2), 0o644)}
    st = repo.open()
    saves = [st.save(JOB, write_tree(tmp_path / "kept", files), {})]
    if repo.kind == "file":
        shm = Path(tempfile.mkdtemp(dir="/dev/shm"))  # tmpfs: another file system than tmp_path
        try:
            saves.append(st.save(JOB, write_tree(shm / "src", files), {}, release=True))
        finally:
            shutil.rmtree(shm)
    else:
        saves.append(st.save(JOB, write_tree(tmp_path / "scratch", files), {}, release=True))
    for info in saves:
        doc, [f] = st._read_manifest(JOB, info.checkpoint_id)
        assert doc["format"] == store_mod.FORMAT and not f.places
    assert read_tree(tmp_path / "kept") == files
    assert not list(tmp_path.glob("repo/jobs/*/packs"))


def test_gc_punches_out_of_a_pack_what_no_manifest_names_and_deletes_it_when_none_does(
    tmp_path: Path,
) -> None:
    repo = file_repo(tmp_path)
    st = repo.open()
    first_data = packed_pages(3)
    a = st.save(JOB, write_tree(tmp_path / "a", {PAGES: (first_data, 0o644)}), {}, release=True)
    changed = first_data[: 2 * CHUNK] + rand(CHUNK, 9) + first_data[3 * CHUNK :]
    b = st.save(JOB, write_tree(tmp_path / "b", {PAGES: (changed, 0o644)}), {}, release=True)
    first, second = pack_paths(repo)
    assert b.stored == CHUNK and second.stat().st_blocks * 512 == CHUNK  # only the new chunk stayed

    st.delete(JOB, a.checkpoint_id)
    r = st.gc()  # default grace: both packs are young
    assert r["packs"] == 2 and r["packs_deleted"] == 0 and r["pack_bytes_trimmed"] == 0
    r = st.gc(grace_seconds=0)
    assert r["packs_deleted"] == 0 and r["pack_bytes_trimmed"] == CHUNK
    assert first.stat().st_blocks * 512 == 2 * CHUNK
    st.fetch(JOB, b.checkpoint_id, tmp_path / "d")
    assert read_tree(tmp_path / "d") == {PAGES: (changed, 0o644)}

    st.delete(JOB, b.checkpoint_id)
    st.save("other-job", write_tree(tmp_path / "c", sample_files()), {})
    r = st.gc(grace_seconds=0)
    assert r["packs_deleted"] == 2 and pack_paths(repo) == []


@pytest.mark.parametrize("how", ["corrupt", "delete"])
def test_a_damaged_pack_marks_the_checkpoint_bad(tmp_path: Path, how: str) -> None:
    repo = file_repo(tmp_path)
    st = repo.open()
    data = packed_pages(4)
    good = st.save(JOB, write_tree(tmp_path / "a", {"x": (b"older", 0o644)}), {})
    info = st.save(JOB, write_tree(tmp_path / "b", {PAGES: (data, 0o644)}), {}, release=True)
    [pack] = pack_paths(repo)
    if how == "delete":
        pack.unlink()
    else:
        with open(pack, "r+b") as f:
            f.seek(CHUNK + 100)
            f.write(b"\0")
    with pytest.raises(CheckpointUnusable):
        st.fetch(JOB, info.checkpoint_id, tmp_path / "d")
    assert st.latest_good(JOB).checkpoint_id == good.checkpoint_id


@pytest.mark.parametrize(
    "entry",
    [
        ["<sha>", CHUNK, CHUNK - 1, "20261129T000000.000Z-abcdef-0", 0],  # packed but not plain
        ["<sha>", CHUNK, CHUNK, "../../chunks/x", 0],
        ["<sha>", CHUNK, CHUNK, "20261129T000000.000Z-abcdef-0", -4096],
        ["<sha>", CHUNK, CHUNK, "20261129T000000.000Z-abcdef-0"],
    ],
)
def test_hostile_pack_entries_are_refused(tmp_path: Path, entry: list[Any]) -> None:
    repo = file_repo(tmp_path)
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "a", {PAGES: (packed_pages(5), 0o644)}), {}, release=True)
    key = f"jobs/{JOB}/checkpoints/{info.checkpoint_id}.json"
    doc = json.loads(st._backend.get(key))["manifest"]
    doc["files"][0]["chunks"][0] = [doc["files"][0]["chunks"][0][0], *entry[1:]]
    st._backend.put(key, store_mod.encode_manifest(doc))
    with pytest.raises(CheckpointUnusable, match=r"manifest .* is invalid"):
        st.fetch(JOB, info.checkpoint_id, tmp_path / "d")


def test_packed_entries_need_format_3(tmp_path: Path) -> None:
    st = file_repo(tmp_path).open()
    info = st.save(JOB, write_tree(tmp_path / "a", {PAGES: (packed_pages(6), 0o644)}), {}, release=True)
    key = f"jobs/{JOB}/checkpoints/{info.checkpoint_id}.json"
    doc = json.loads(st._backend.get(key))["manifest"]
    st._backend.put(key, store_mod.encode_manifest({**doc, "format": store_mod.FORMAT}))
    with pytest.raises(CheckpointUnusable, match="bad chunk entry"):
        st.fetch(JOB, info.checkpoint_id, tmp_path / "d")


def test_a_file_store_with_packs_copied_into_s3_restores_from_there(s3_server: str, tmp_path: Path) -> None:
    """A pack's chunks are read with ranged GETs, fetched and streamed alike."""
    repo = file_repo(tmp_path)
    files = {PAGES: (packed_pages(7), 0o644)}
    info = repo.open().save(JOB, write_tree(tmp_path / "src", files), {}, release=True)
    s3 = open_store(f"s3://{S3_BUCKET}/{uuid.uuid4().hex}", endpoint_url=s3_server, chunk_size=CHUNK)
    root = tmp_path / "repo"
    for path in root.rglob("*"):
        if path.is_file():
            s3._backend.put(path.relative_to(root).as_posix(), path.read_bytes())
    s3.fetch(JOB, info.checkpoint_id, tmp_path / "d")
    assert read_tree(tmp_path / "d") == files
    got = s3.fetch(JOB, info.checkpoint_id, tmp_path / "s", defer=PAGES.__eq__)
    assert drain(got.deferred[PAGES]) == (files[PAGES][0], None)


# ---------------------------------------------------------------------------------------------
# Crash safety and failing saves

CRASH_SCRIPT = """
import json, os, sys
from mmshim import store
url, opts, job, src, point, n, key_part = sys.argv[1:8]
n = int(n)

def hook(p, count=0, key="", **kw):
    if p == point and count >= n and key_part in key:
        os._exit(17)

store._fault_hook = hook
store.open_store(url, **json.loads(opts)).save(job, src, {"crashed": True}, release="release" in sys.argv[8:])
os._exit(0)
"""


@pytest.mark.parametrize(
    ("point", "n", "key_part"),
    [
        ("inflight_written", 0, ""),
        ("chunk_written", 1, ""),
        ("chunk_written", 6, ""),
        ("before_manifest", 0, ""),
        ("tmp_written", 0, "/checkpoints/"),  # manifest temp file written, not renamed (file store)
        ("manifest_written", 0, ""),  # after the manifest: the checkpoint is complete
    ],
)
def test_killed_save_leaves_no_half_checkpoint(
    repo: Repo, tmp_path: Path, point: str, n: int, key_part: str
) -> None:
    if point == "tmp_written" and repo.kind != "file":
        pytest.skip("S3 PUTs have no temp files")
    st = repo.open()
    first_files = sample_files(1)
    first = st.save(JOB, write_tree(tmp_path / "src1", first_files), {})
    src2 = write_tree(tmp_path / "src2", sample_files(2))

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [repo.url, json.dumps(repo.options), JOB, str(src2), point, str(n), key_part]
    r = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 17, r.stderr

    listed = st.checkpoints(JOB)
    if point == "manifest_written":
        assert len(listed) == 2 and listed[0].meta == {"crashed": True}
        dest = tmp_path / "dest"
        assert st.fetch_latest(JOB, dest).checkpoint_id == listed[0].checkpoint_id
        assert read_tree(dest) == read_tree(src2)
        return
    assert [c.checkpoint_id for c in listed] == [first.checkpoint_id]
    assert st.latest_good(JOB).checkpoint_id == first.checkpoint_id
    dest = tmp_path / "dest"
    assert st.fetch_latest(JOB, dest).checkpoint_id == first.checkpoint_id
    assert read_tree(dest) == first_files
    # The dead save's marker keeps gc away from its chunks until the grace period is over.
    assert len(inflight_keys(st, JOB)) == 1
    keys = chunk_keys(st)
    assert st.gc(grace_seconds=3600)["in_flight"] and chunk_keys(st) == keys


@pytest.mark.parametrize("point", ["chunk_written", "before_manifest"])
def test_a_killed_release_save_leaves_its_pack_to_gc(tmp_path: Path, point: str) -> None:
    """Killed before its manifest, a save that took a file as a pack (published or not) leaves
    nothing listed, and gc removes the pack once the save's marker is stale."""
    repo = file_repo(tmp_path)
    st = repo.open()
    files = {PAGES: (packed_pages(8), 0o644)}
    first = st.save(JOB, write_tree(tmp_path / "src1", files), {}, release=True)
    [pack] = pack_paths(repo)
    src2 = write_tree(tmp_path / "src2", {PAGES: (packed_pages(9), 0o644)})
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [
        repo.url,
        json.dumps(repo.options),
        JOB,
        str(src2),
        point,
        str(int(point == "chunk_written")),
        "",
        "release",
    ]
    r = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 17, r.stderr
    assert len(pack_paths(repo)) == (2 if point == "before_manifest" else 1)
    assert [c.checkpoint_id for c in st.checkpoints(JOB)] == [first.checkpoint_id]
    st.gc(grace_seconds=0)
    assert pack_paths(repo) == [pack]
    st.fetch_latest(JOB, tmp_path / "d")
    assert read_tree(tmp_path / "d") == files


def test_failed_save_leaves_previous_untouched(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = repo.open()
    first = st.save(JOB, write_tree(tmp_path / "src1", sample_files(1)), {})

    def hook(point: str, count: int = 0, **kw: Any) -> None:
        if point == "chunk_written" and count == 3:
            raise RuntimeError("injected failure")

    monkeypatch.setattr(store_mod, "_fault_hook", hook)
    with pytest.raises(StoreError, match="injected failure"):
        st.save(JOB, write_tree(tmp_path / "src2", sample_files(2)), {})
    assert [c.checkpoint_id for c in st.checkpoints(JOB)] == [first.checkpoint_id]
    assert inflight_keys(st, JOB) == []
    assert st.fetch_latest(JOB, tmp_path / "dest").checkpoint_id == first.checkpoint_id


def test_disk_full_is_a_store_error_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "repo"
    st = open_store(f"file://{root}", chunk_size=CHUNK, concurrency=2)
    first = st.save(JOB, write_tree(tmp_path / "src1", sample_files(1)), {})
    real_write = store_mod._write_all
    calls = [0]

    def write_all(fd: int, data: bytes) -> None:
        calls[0] += 1
        if calls[0] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(store_mod, "_write_all", write_all)
    chunks = chunk_keys(st)
    with pytest.raises(StoreError, match="no space left on device"):
        st.save(JOB, write_tree(tmp_path / "src2", sample_files(2)), {})
    monkeypatch.setattr(store_mod, "_write_all", real_write)
    assert [p for p in all_paths(root) if ".tmp-" in p] == []
    assert chunk_keys(st) == chunks  # the chunks it had written are not published either
    assert [c.checkpoint_id for c in st.checkpoints(JOB)] == [first.checkpoint_id]
    assert st.fetch_latest(JOB, tmp_path / "dest").checkpoint_id == first.checkpoint_id


def test_file_store_publishes_chunks_durable_and_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save's chunk appears under its name only once its data is fsynced (a power cut never
    leaves a torn chunk that a later save would take for stored), and only once all the save's
    chunks are written (one journal commit for all, not one each)."""
    st = open_store(f"file://{tmp_path / 'repo'}", chunk_size=CHUNK, concurrency=2)
    synced: set[int] = set()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.add(os.fstat(fd).st_ino)

    def replace(src: str, dst: str) -> None:
        if "/chunks/" in str(dst):
            assert os.stat(src).st_ino in synced, f"{dst} renamed before its data was synced"
        real_replace(src, dst)

    seen: list[set[str]] = []

    def hook(point: str, key: str = "", **info: Any) -> None:
        if point == "tmp_written" and key.startswith("chunks/"):
            seen.append(chunk_keys(st))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(store_mod, "_fault_hook", hook)
    info = st.save(JOB, write_tree(tmp_path / "src", sample_files(1)), {})
    assert len(seen) > 2 and all(visible == set() for visible in seen)
    assert chunk_keys(st) == manifest_chunks(st, JOB, info.checkpoint_id)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints


def damage(st: Store, job: str, cid: str, how: str, exclude: set[str]) -> None:
    key = sorted(manifest_chunks(st, job, cid) - exclude)[0]
    b = st._backend
    if how == "corrupt_chunk":  # a valid zstd frame of the right size, but other bytes
        raw = stored_raw(b.get(key))
        b.put(key, zstandard.ZstdCompressor().compress(b"\x01" * len(raw)))
    elif how == "garbage_chunk":
        b.put(key, b"definitely not zstd")
    elif how == "delete_chunk":
        b.delete([key])
    elif how == "flip_last_byte":  # still the right size, or a frame that decodes
        data = b.get(key)
        b.put(key, data[:-1] + bytes([data[-1] ^ 1]))
    elif how == "truncate_manifest":
        mkey = f"jobs/{job}/checkpoints/{cid}.json"
        data = b.get(mkey)
        b.put(mkey, data[: len(data) // 2])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["corrupt_chunk", "garbage_chunk", "delete_chunk", "truncate_manifest"])
def test_damaged_checkpoint_is_marked_bad_and_skipped(repo: Repo, tmp_path: Path, how: str) -> None:
    st = repo.open()
    files_a, files_b = sample_files(1), sample_files(2)
    a = st.save(JOB, write_tree(tmp_path / "a", files_a), {"n": "a"})
    b = st.save(JOB, write_tree(tmp_path / "b", files_b), {"n": "b"})
    a_chunks = manifest_chunks(st, JOB, a.checkpoint_id)
    damage(st, JOB, b.checkpoint_id, how, exclude=a_chunks)

    dest_b = tmp_path / "dest-b"
    with pytest.raises(CheckpointUnusable):
        st.fetch(JOB, b.checkpoint_id, dest_b)
    assert all_paths(dest_b) == []  # what the failed fetch created is gone
    states = {c.checkpoint_id: c.state for c in st.checkpoints(JOB)}
    assert states == {a.checkpoint_id: "good", b.checkpoint_id: "bad"}
    assert st.latest_good(JOB).checkpoint_id == a.checkpoint_id
    with pytest.raises(CheckpointUnusable, match="marked bad"):
        st.fetch(JOB, b.checkpoint_id, dest_b)

    dest = tmp_path / "dest"
    assert st.fetch_latest(JOB, dest).checkpoint_id == a.checkpoint_id
    assert read_tree(dest) == files_a

    # fetch_latest itself finds the damage, marks it, and has nothing left: None.
    damage(st, JOB, a.checkpoint_id, "delete_chunk" if how == "truncate_manifest" else how, exclude=set())
    dest2 = tmp_path / "dest2"
    assert st.fetch_latest(JOB, dest2) is None
    assert all_paths(dest2) == []
    assert [c.state for c in st.checkpoints(JOB)] == ["bad", "bad"]
    assert st.latest_good(JOB) is None


def test_altered_manifest_fails_its_checksum(repo: Repo, tmp_path: Path) -> None:
    """A manifest that still parses but was changed (here: one byte of a size) is refused."""
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "src", {"f": (b"x" * 1234, 0o644)}), {})
    key = f"jobs/{JOB}/checkpoints/{info.checkpoint_id}.json"
    data = st._backend.get(key)
    assert b'"size":1234' in data
    st._backend.put(key, data.replace(b'"size":1234', b'"size":1235', 1))
    with pytest.raises(CheckpointUnusable, match="checksum"):
        st.fetch(JOB, info.checkpoint_id, tmp_path / "dest")
    assert st.latest_good(JOB) is None


def test_damage_found_by_fetch_latest_falls_back(repo: Repo, tmp_path: Path) -> None:
    st = repo.open()
    a = st.save(JOB, write_tree(tmp_path / "a", sample_files(1)), {})
    b = st.save(JOB, write_tree(tmp_path / "b", sample_files(2)), {})
    damage(st, JOB, b.checkpoint_id, "garbage_chunk", exclude=manifest_chunks(st, JOB, a.checkpoint_id))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep-me").write_bytes(b"caller's file")
    totals: list[int] = []
    assert st.fetch_latest(JOB, dest, progress=totals.append).checkpoint_id == a.checkpoint_id
    assert read_tree(dest) == {**sample_files(1), "keep-me": (b"caller's file", 0o644)}
    assert totals[-1] == a.size  # each attempt reports; the fallback's count starts again
    assert {c.checkpoint_id: c.state for c in st.checkpoints(JOB)}[b.checkpoint_id] == "bad"


# ---------------------------------------------------------------------------------------------
# Deferred files: streamed, in order, into a restoring CRIU's pipe

PAGES = "criu/pages-1.img"


def drain(st_file: store_mod.DeferredFile, progress: Any = None) -> tuple[bytes, BaseException | None]:
    """What the deferred file writes into a pipe (as into CRIU's), and what it raised."""
    r, w = os.pipe()
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: os.read(r, 1 << 20), b"")))
    reader.start()
    error = None
    try:
        st_file.write_to(w, progress)
    except BaseException as e:
        error = e
    os.close(w)
    reader.join()
    os.close(r)
    return b"".join(out), error


def mixed_pages(seed: int) -> bytes:
    """Chunks that do not compress (a file store sends them from their files), a recurring one,
    zeros and text."""
    noise = rand(CHUNK, seed)
    text = (b"text %d " % seed) * (CHUNK // 7)
    return noise + bytes(CHUNK) + noise + text[:CHUNK] + rand(CHUNK // 2 + 100, seed + 1)


def with_mixed_pages(seed: int) -> dict[str, tuple[bytes, int]]:
    return {**sample_files(seed), PAGES: (mixed_pages(seed), 0o644)}


def test_deferred_file_streams_what_fetch_would_write(repo: Repo, tmp_path: Path) -> None:
    files = with_mixed_pages(1)
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "src", files), {})
    dest = tmp_path / "dest"
    got = st.fetch(JOB, info.checkpoint_id, dest, defer=lambda name: name.startswith("criu/pages-"))
    assert read_tree(dest) == {k: v for k, v in files.items() if k != PAGES}  # left out
    assert list(got.deferred) == [PAGES] and got.deferred[PAGES].size == len(files[PAGES][0])
    totals: list[int] = []
    fds = open_fds()
    data, error = drain(got.deferred[PAGES], totals.append)
    assert error is None and data == files[PAGES][0]
    assert totals[-1] == len(data) and totals == sorted(totals)
    assert open_fds() == fds  # a file store's chunk files, sent from, are all closed again


def cycled_text(distinct: int, rounds: int) -> bytes:
    """Compressible chunks recurring in a cycle longer than the streaming look-ahead (8 chunks),
    as text memory's do."""
    return b"".join([(b"line %d of text " % i * CHUNK)[:CHUNK] for i in range(distinct)] * rounds)


def counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Calls of the store function ``name``, by chunk hash."""
    calls: list[str] = []
    real = getattr(store_mod, name)

    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(args[2])  # (data or future, where, sha, raw_len)
        return real(*args, **kw)

    monkeypatch.setattr(store_mod, name, counted)
    return calls


def test_deferred_file_decodes_a_recurring_chunk_once(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each recurring chunk is fetched, verified and decoded once, then sent from the spill file,
    which leaves nothing behind."""
    pages = cycled_text(10, 3)
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "src", {PAGES: (pages, 0o644)}), {})
    dest = tmp_path / "dest"
    got = st.fetch(JOB, info.checkpoint_id, dest, defer=PAGES.__eq__)
    decoded = counting(monkeypatch, "_decoded")
    fds, left = open_fds(), sorted(dest.rglob("*"))
    assert drain(got.deferred[PAGES]) == (pages, None)
    assert len(decoded) == len(set(decoded)) == 10
    assert open_fds() == fds and sorted(dest.rglob("*")) == left


def test_deferred_file_reads_a_bounded_window_ahead(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory stays bounded: while the first chunk is being sent, at most ``concurrency`` more
    have been asked for, whatever the file's size."""
    pages = rand(CHUNK * 20, 3) + cycled_text(10, 2)
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "src", {PAGES: (pages, 0o644)}), {})
    got = st.fetch(JOB, info.checkpoint_id, tmp_path / "dest", defer=PAGES.__eq__)
    asked = counting_keys(monkeypatch)
    with contextlib.closing(got.deferred[PAGES]._chunks()) as chunks:
        for i, _ in enumerate(chunks):
            assert len(asked) <= i + 1 + st.concurrency
    assert len(asked) == 40 - 10  # the second round of text came from the spill


def counting_keys(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the chunks a restore asks its store's transfers for, in order."""
    asked: list[str] = []

    def counted(real: Callable[..., Any]) -> Callable[..., Any]:
        return lambda self, key, *args: asked.append(key) or real(self, key, *args)

    for cls, name in [
        (store_mod._FileTransfers, "get"),
        (store_mod._FileTransfers, "open"),
        (store_mod._S3Transfers, "get"),
    ]:
        monkeypatch.setattr(cls, name, counted(getattr(cls, name)))
    return asked


@pytest.mark.parametrize("limit", ["full_disk", "budget"])
def test_deferred_file_without_room_to_spill_fetches_again(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, limit: str
) -> None:
    """No room for the decoded chunks (a full disk, or past the budget): the data is still right,
    recurring chunks are fetched and decoded again, a full disk is logged."""
    pages = cycled_text(10, 3)
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "src", {PAGES: (pages, 0o644)}), {})
    got = st.fetch(JOB, info.checkpoint_id, tmp_path / "dest", defer=PAGES.__eq__)
    if limit == "full_disk":

        def full(*args: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store_mod, "_pwrite_all", full)
    else:
        monkeypatch.setattr(store_mod, "_SPILL_BUDGET", 3 * CHUNK)
    verified = counting(monkeypatch, "_verified")
    fds = open_fds()
    assert drain(got.deferred[PAGES]) == (pages, None)
    assert open_fds() == fds
    assert len(set(verified)) == 10
    assert len(verified) == (30 if limit == "full_disk" else 3 + 7 * 3)
    assert ("cannot spill" in caplog.text) == (limit == "full_disk")


def test_deferred_file_decodes_a_chunk_that_is_not_raw_blocks_after_all(repo: Repo, tmp_path: Path) -> None:
    """A chunk larger stored than raw is read as raw blocks from a file store, but another frame
    of the same data (zstd's own, from another writer) is decoded instead, its file closed."""
    files = with_mixed_pages(1)
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "src", files), {})
    noise = store_mod.chunk_hash(rand(CHUNK, 1))
    st._backend.put(f"chunks/{noise[:2]}/{noise}", zstandard.ZstdCompressor().compress(rand(CHUNK, 1)))
    got = st.fetch(JOB, info.checkpoint_id, tmp_path / "dest", defer=PAGES.__eq__)
    fds = open_fds()
    assert drain(got.deferred[PAGES]) == (files[PAGES][0], None)
    assert open_fds() == fds
    assert {c.checkpoint_id: c.state for c in st.checkpoints(JOB)}[info.checkpoint_id] == "good"


@pytest.mark.parametrize("chunk", ["noise", "text"])
@pytest.mark.parametrize("how", ["corrupt_chunk", "garbage_chunk", "delete_chunk", "flip_last_byte"])
def test_deferred_damage_marks_bad_and_stops_short(repo: Repo, tmp_path: Path, how: str, chunk: str) -> None:
    """Damage found while streaming, in a chunk stored as raw blocks or compressed: nothing wrong
    is written (the pipe got a prefix of the true data), the checkpoint is marked bad and the
    next fetch_latest takes the previous one."""
    st = repo.open()
    a = st.save(JOB, write_tree(tmp_path / "a", with_mixed_pages(1)), {})
    pages_b = mixed_pages(2)
    b = st.save(JOB, write_tree(tmp_path / "b", with_mixed_pages(2)), {})
    target = store_mod.chunk_hash(pages_b[:CHUNK] if chunk == "noise" else pages_b[3 * CHUNK : 4 * CHUNK])
    others = manifest_chunks(st, JOB, b.checkpoint_id) | manifest_chunks(st, JOB, a.checkpoint_id)
    damage(st, JOB, b.checkpoint_id, how, exclude=others - {f"chunks/{target[:2]}/{target}"})
    defer = PAGES.__eq__
    got = st.fetch_latest(JOB, tmp_path / "dest", defer=defer)  # the small files are all right
    assert got.checkpoint_id == b.checkpoint_id
    fds = open_fds()
    data, error = drain(got.deferred[PAGES])
    assert isinstance(error, CheckpointUnusable)
    assert open_fds() == fds
    assert len(data) < len(pages_b) and pages_b.startswith(data)
    assert {c.checkpoint_id: c.state for c in st.checkpoints(JOB)}[b.checkpoint_id] == "bad"
    again = st.fetch_latest(JOB, tmp_path / "dest2", defer=defer)
    assert again.checkpoint_id == a.checkpoint_id
    assert drain(again.deferred[PAGES]) == (mixed_pages(1), None)


def test_deferred_file_stops_when_its_reader_goes(repo: Repo, tmp_path: Path) -> None:
    """CRIU gone part-way: write_to raises at once, its downloads stop, its files are closed."""
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "src", with_mixed_pages(1)), {})
    got = st.fetch(JOB, info.checkpoint_id, tmp_path / "dest", defer=PAGES.__eq__)
    fds = open_fds()
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(BrokenPipeError):
        got.deferred[PAGES].write_to(w)
    os.close(w)
    assert open_fds() == fds
    assert {c.checkpoint_id: c.state for c in st.checkpoints(JOB)}[info.checkpoint_id] == "good"


# ---------------------------------------------------------------------------------------------
# Hostile input

HOSTILE_IDS = [
    *("", ".", "..", "../x", "a/b", "/abs", "a\\b", "a\x00b", "a\nb", "x" * 129),
    *(".hidden", "-x", "a..b", "a b", "é", "a/../../etc"),
]


@pytest.mark.parametrize("job", HOSTILE_IDS)
def test_hostile_job_ids_are_refused(repo: Repo, tmp_path: Path, job: str) -> None:
    with pytest.raises(InvalidJobId):
        validate_job_id(job)
    src = write_tree(tmp_path / "src", {"f": (b"x", 0o644)})
    st = repo.open()
    calls = [
        lambda: st.save(job, src, {}),
        lambda: st.checkpoints(job),
        lambda: st.latest_good(job),
        lambda: st.fetch(job, "20260101T000000.000Z-abcdef", tmp_path / "dest"),
        lambda: st.fetch_latest(job, tmp_path / "dest"),
        lambda: st.delete(job),
        lambda: st.retain(job),
        lambda: st.put_event(job, {}),
        lambda: st.events(job),
    ]
    for call in calls:
        with pytest.raises(InvalidJobId):
            call()
    assert st.jobs() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == (["repo", "src"] if repo.kind == "file" else ["src"])
    if repo.kind == "file":
        assert all_paths(tmp_path / "repo") == []


@pytest.mark.parametrize("job", [JOB, JOB + ":17", "local-run_1.2", "A" * 128])
def test_valid_job_ids(repo: Repo, tmp_path: Path, job: str) -> None:
    assert validate_job_id(job) == job
    st = repo.open()
    info = st.save(job, write_tree(tmp_path / "src", {"f": (b"x", 0o644)}), {})
    assert st.latest_good(job).checkpoint_id == info.checkpoint_id
    assert st.jobs() == [job]


@pytest.mark.parametrize(
    "name",
    [
        "../evil",
        "{outside}/evil",
        "a/../../evil",
        "",
        ".",
        "sub//evil",
        "sub/./evil",
        "x\\..\\evil",
        "a\x00b",
    ],
)
def test_hostile_manifest_names_are_refused(repo: Repo, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "src", {"a": (b"payload", 0o644)}), {})
    doc, _ = st._read_manifest(JOB, info.checkpoint_id)
    doc["files"][0]["name"] = name.format(outside=outside)
    st._backend.put(f"jobs/{JOB}/checkpoints/{info.checkpoint_id}.json", store_mod.encode_manifest(doc))

    work = tmp_path / "work"
    with pytest.raises(CheckpointUnusable):
        st.fetch(JOB, info.checkpoint_id, work / "dest")
    assert all_paths(outside) == []
    assert [p for p in all_paths(work) if p != "dest"] == []
    assert st.checkpoints(JOB)[0].state == "bad"
    assert st.fetch_latest(JOB, work / "dest") is None


def test_fetch_never_writes_through_a_symlink(repo: Repo, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    st = repo.open()
    info = st.save(JOB, write_tree(tmp_path / "src", {"criu/x.img": (b"payload", 0o644)}), {})
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "criu").symlink_to(outside)
    with pytest.raises(StoreError, match="symlink"):
        st.fetch(JOB, info.checkpoint_id, dest)
    assert all_paths(outside) == []
    assert st.checkpoints(JOB)[0].state == "good"  # the dest dir's fault, not the checkpoint's


# ---------------------------------------------------------------------------------------------
# Retention and gc


def test_retain_keeps_newest_good(repo: Repo, tmp_path: Path) -> None:
    st = repo.open()
    ids = [
        st.save(JOB, write_tree(tmp_path / f"s{i}", sample_files(i)), {"i": i}).checkpoint_id
        for i in range(4)
    ]
    c0, c1, c2, c3 = ids
    assert ids == sorted(ids)
    st._mark_bad(JOB, c3, "test")
    assert st.retain(JOB, keep=2) == [c0]
    assert [(c.checkpoint_id, c.state) for c in st.checkpoints(JOB)] == [
        (c3, "bad"),
        (c2, "good"),
        (c1, "good"),
    ]
    c4 = st.save(JOB, tmp_path / "s0", {}).checkpoint_id
    assert st.retain(JOB, keep=2) == [c1]
    assert [c.checkpoint_id for c in st.checkpoints(JOB)] == [c4, c3, c2]
    assert st.retain(JOB, keep=2) == []
    with pytest.raises(StoreError):
        st.retain(JOB, keep=0)


def test_gc_deletes_only_unreferenced_old_chunks(repo: Repo, tmp_path: Path) -> None:
    st = repo.open()
    a = st.save(JOB, write_tree(tmp_path / "a", sample_files(1)), {})
    b = st.save(JOB, write_tree(tmp_path / "b", sample_files(2)), {})
    b_chunks = manifest_chunks(st, JOB, b.checkpoint_id)
    a_only = manifest_chunks(st, JOB, a.checkpoint_id) - b_chunks
    assert a_only
    st.delete(JOB, a.checkpoint_id)
    assert [c.checkpoint_id for c in st.checkpoints(JOB)] == [b.checkpoint_id]

    before = chunk_keys(st)
    r = st.gc()  # default grace: every chunk is young
    assert r["deleted"] == 0 and r["young"] == len(a_only) and chunk_keys(st) == before

    r = st.gc(grace_seconds=0)
    assert r["deleted"] == len(a_only) and r["deleted_bytes"] > 0
    assert chunk_keys(st) == b_chunks
    st.fetch(JOB, b.checkpoint_id, tmp_path / "dest")
    assert read_tree(tmp_path / "dest") == sample_files(2)


def test_gc_deletes_nothing_while_a_save_is_in_flight(repo: Repo, tmp_path: Path) -> None:
    st = repo.open()
    a = st.save(JOB, write_tree(tmp_path / "a", sample_files(1)), {})
    a_chunks = manifest_chunks(st, JOB, a.checkpoint_id)
    st.delete(JOB, a.checkpoint_id)
    # A crashed save's marker, long stale: must not block gc, and gets removed.
    st._backend.put("jobs/old-job/inflight/20200101T000000.000Z-abcdef", b'{"created": 0}')
    st._clock = lambda: time.time() + 1000  # every chunk now looks 1000 s old
    before = chunk_keys(st)

    src = tmp_path / "growing"
    src.mkdir()
    (src / "pages.img").write_bytes(rand(3 * CHUNK, 42))
    done = threading.Event()
    result: list[CheckpointInfo] = []
    saver = threading.Thread(target=lambda: result.append(st.save("job-2", src, {}, done=done)))
    saver.start()
    try:
        deadline = time.monotonic() + 30
        while not inflight_keys(st, "job-2") and time.monotonic() < deadline:
            time.sleep(0.01)
        r = st.gc(grace_seconds=100)
        assert r["in_flight"] and r["deleted"] == 0
        assert before <= chunk_keys(st)
    finally:
        done.set()
        saver.join()

    r = st.gc(grace_seconds=100)
    assert r["in_flight"] == [] and r["deleted"] == len(a_chunks) and r["stale_markers"] == 1
    assert chunk_keys(st) == manifest_chunks(st, "job-2", result[0].checkpoint_id)
    assert inflight_keys(st, "old-job") == []
    st.fetch("job-2", result[0].checkpoint_id, tmp_path / "dest")
    assert (tmp_path / "dest/pages.img").read_bytes() == rand(3 * CHUNK, 42)


def test_delete_job_and_checkpoint(repo: Repo, tmp_path: Path) -> None:
    st = repo.open()
    src = write_tree(tmp_path / "src", {"f": (b"x" * 100, 0o644)})
    a = st.save(JOB, src, {})
    b = st.save(JOB, src, {})
    st.save("job-2", src, {})
    st.put_event(JOB, {"e": 1})
    st.delete(JOB, b.checkpoint_id)
    assert [c.checkpoint_id for c in st.checkpoints(JOB)] == [a.checkpoint_id]
    st.delete(JOB)
    assert st.checkpoints(JOB) == [] and st.events(JOB) == [] and st.latest_good(JOB) is None
    assert st.jobs() == ["job-2"]


# ---------------------------------------------------------------------------------------------
# Events, latest_good


def test_events_in_order(repo: Repo) -> None:
    st = repo.open()
    for i in range(12):
        st.put_event(JOB, {"i": i, "kind": "tick"})
    st.put_event("job-2", {"i": -1})
    assert [e["i"] for e in st.events(JOB)] == list(range(12))
    assert st.events("job-2") == [{"i": -1}]
    assert st.events("job-3") == []
    with pytest.raises(StoreError):
        st.put_event(JOB, {"bad": object()})
    with pytest.raises(StoreError):
        st.put_event(JOB, ["not", "a", "dict"])  # type: ignore[arg-type]


def test_latest_good(repo: Repo, tmp_path: Path) -> None:
    st = repo.open()
    dest = tmp_path / "dest"
    assert st.latest_good(JOB) is None
    assert st.fetch_latest(JOB, dest) is None
    assert not dest.exists() or all_paths(dest) == []
    a = st.save(JOB, write_tree(tmp_path / "a", sample_files(1)), {"n": "a"})
    b = st.save(JOB, write_tree(tmp_path / "b", sample_files(2)), {"n": "b"})
    for i in range(30):
        st.put_event(JOB, {"i": i})
    assert same_info(st.latest_good(JOB), b)
    st._mark_bad(JOB, b.checkpoint_id, "test")
    assert same_info(st.latest_good(JOB), a)

    if repo.kind == "s3":  # used on every Batch retry: one listing and one GET
        requests: list[str] = []
        st._backend.client.meta.events.register(
            "before-send.s3", lambda request, **kw: requests.append(request.url)
        )
        st.latest_good(JOB)
        assert len(requests) == 2, requests


def test_sse_and_storage_class(s3_server: str, tmp_path: Path) -> None:
    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    st = open_store(url, endpoint_url=s3_server, chunk_size=CHUNK, sse="AES256", storage_class="STANDARD_IA")
    info = st.save(JOB, write_tree(tmp_path / "src", {"f": (rand(3 * CHUNK, 1), 0o644)}), {})
    st.put_event(JOB, {"e": 1})
    client, prefix = st._backend.client, st._backend.prefix

    def head(key: str) -> dict[str, Any]:
        return client.head_object(Bucket=S3_BUCKET, Key=prefix + key)

    for key in [
        *manifest_chunks(st, JOB, info.checkpoint_id),
        f"jobs/{JOB}/checkpoints/{info.checkpoint_id}.json",
    ]:
        h = head(key)
        assert h.get("ServerSideEncryption") == "AES256" and h.get("StorageClass") == "STANDARD_IA", key
    [event] = [o.key for o in st._backend.list(f"jobs/{JOB}/events/")]
    h = head(event)
    assert h.get("ServerSideEncryption") == "AES256" and h.get("StorageClass", "STANDARD") == "STANDARD"


# ---------------------------------------------------------------------------------------------
# Outages and configuration


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def failing_endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    """An endpoint that refuses connections, or one that answers 503 to everything."""
    if request.param == "refused":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
        return

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def _fail(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _fail

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("failing_endpoint", ["refused", "http503"], indirect=True)
def test_s3_outage_is_a_store_error(aws_env: None, failing_endpoint: str, tmp_path: Path) -> None:
    st = open_store(
        "s3://bucket/prefix", endpoint_url=failing_endpoint, max_attempts=2, connect_timeout=1, read_timeout=2
    )
    src = write_tree(tmp_path / "src", {"f": (b"x" * 1000, 0o644)})
    calls = [
        lambda: st.save(JOB, src, {}),
        lambda: st.latest_good(JOB),
        lambda: st.checkpoints(JOB),
        lambda: st.fetch_latest(JOB, tmp_path / "dest"),
        lambda: st.put_event(JOB, {}),
        lambda: st.gc(),
    ]
    for call in calls:
        with pytest.raises(StoreError) as exc:
            call()
        assert not isinstance(exc.value, CheckpointUnusable)
        assert "cannot reach" in str(exc.value) or "ServiceUnavailable" in str(exc.value)


def test_s3_missing_bucket(s3_server: str, tmp_path: Path) -> None:
    st = open_store("s3://no-such-bucket-mmshim/x", endpoint_url=s3_server, max_attempts=1)
    with pytest.raises(StoreError, match="does not exist"):
        st.save(JOB, write_tree(tmp_path / "src", {"f": (b"x", 0o644)}), {})


def test_save_mid_transfer_outage_keeps_previous(s3_server: str, tmp_path: Path) -> None:
    """Chunk uploads failing mid-save fail the save; the previous checkpoint stays."""
    st = open_store(
        f"s3://{S3_BUCKET}/{uuid.uuid4().hex}", endpoint_url=s3_server, chunk_size=CHUNK, max_attempts=2
    )
    first = st.save(JOB, write_tree(tmp_path / "a", sample_files(1)), {})
    from botocore.exceptions import ClientError

    def fail_chunk_puts(params: dict[str, Any], **kw: Any) -> None:
        if "/chunks/" in params["Key"]:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "injected"}}, "PutObject")

    st._backend.client.meta.events.register("provide-client-params.s3.PutObject", fail_chunk_puts)
    with pytest.raises(StoreError, match="SlowDown"):
        st.save(JOB, write_tree(tmp_path / "b", sample_files(2)), {})
    assert [c.checkpoint_id for c in st.checkpoints(JOB)] == [first.checkpoint_id]
    assert inflight_keys(st, JOB) == []
    assert st.fetch_latest(JOB, tmp_path / "dest").checkpoint_id == first.checkpoint_id


def test_fetch_outage_does_not_mark_bad(s3_server: str, tmp_path: Path) -> None:
    """S3 failing mid-fetch is an outage, not a damaged checkpoint: StoreError, nothing marked."""
    from botocore.exceptions import ClientError

    st = open_store(f"s3://{S3_BUCKET}/{uuid.uuid4().hex}", endpoint_url=s3_server, chunk_size=CHUNK)
    info = st.save(JOB, write_tree(tmp_path / "a", sample_files(1)), {})

    def fail_chunk_gets(params: dict[str, Any], **kw: Any) -> None:
        if "/chunks/" in params["Key"]:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "GetObject")

    st._backend.client.meta.events.register("provide-client-params.s3.GetObject", fail_chunk_gets)
    dest = tmp_path / "dest"
    with pytest.raises(StoreError, match="InternalError") as exc:
        st.fetch_latest(JOB, dest)
    assert not isinstance(exc.value, CheckpointUnusable)
    assert all_paths(dest) == []
    st._backend.client.meta.events.unregister("provide-client-params.s3.GetObject", fail_chunk_gets)
    assert [c.state for c in st.checkpoints(JOB)] == ["good"]
    assert st.fetch_latest(JOB, dest).checkpoint_id == info.checkpoint_id


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("http://example/x", {}),
        ("file://relative/path", {}),
        ("relative/path", {}),
        ("s3://", {}),
        ("s3://bucket/../x", {}),
        ("file:///tmp/x", {"chunk_size": 1000}),
        ("file:///tmp/x", {"concurrency": 0}),
        ("file:///tmp/x", {"no_such_option": 1}),
        ("s3://bucket/x", {"sse": "rot13"}),
        ("s3://bucket/x", {"kms_key_id": "k"}),
    ],
)
def test_open_store_refuses_bad_configuration(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(StoreError):
        open_store(url, **options)


def test_open_store_file_forms(tmp_path: Path) -> None:
    assert open_store(str(tmp_path / "a")).url == f"file://{tmp_path}/a"
    assert open_store(f"file://{tmp_path}/b", endpoint_url=None, sse=None).url == f"file://{tmp_path}/b"
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()


def test_save_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    st = open_store(f"file://{tmp_path}/repo")
    with pytest.raises(StoreError, match="not a directory"):
        st.save(JOB, tmp_path / "missing", {})
    src = write_tree(tmp_path / "src", {"f": (b"x", 0o644)})
    with pytest.raises(StoreError, match="JSON"):
        st.save(JOB, src, {"x": object()})
    assert st.checkpoints(JOB) == []

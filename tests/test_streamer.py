"""The image streamer against a client that speaks CRIU's side of the protocol (img-streamer.c)."""

import os
import socket
import struct
import time
from pathlib import Path

import pytest
from pycriu.images import img_streamer_pb2

from mmshim import streamer


class FakeCriu:
    """CRIU's restore side: one connection; per image a request, a reply, then a pipe it reads."""

    def __init__(self, images: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dfd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
        try:  # as CRIU does: through /proc/<runc>/fd/<images dir>, whatever the directory's path
            self.sock.connect(f"/proc/self/fd/{dfd}/{streamer.SOCKET}")
        finally:
            os.close(dfd)

    def read(self, name: str, pace: float = 0.0) -> bytes | None:
        req = img_streamer_pb2.img_streamer_request_entry(filename=name).SerializeToString()
        self.sock.sendall(struct.pack("=I", len(req)) + req)
        size = struct.unpack("=I", self._exactly(4))[0]
        reply = img_streamer_pb2.img_streamer_reply_entry()
        reply.ParseFromString(self._exactly(size))
        if not reply.exists:
            return None
        r, w = os.pipe()
        socket.send_fds(self.sock, [b"\0"], [w])
        os.close(w)
        with os.fdopen(r, "rb", buffering=0) as f:
            out = []
            while piece := f.read(65536):
                out.append(piece)
                time.sleep(pace)
            return b"".join(out)

    def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            more = self.sock.recv(n - len(buf))
            assert more, "streamer hung up"
            buf += more
        return buf

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / ("long-" * 20) / "criu"  # deeper than a socket path may be: bound via /proc
    d.mkdir(parents=True)
    (d / "inventory.img").write_bytes(b"inv" * 1000)
    (d / "tmpfs-dev-41.tar.gz.img").write_bytes(os.urandom(3 << 20))  # more than a pipe holds
    (tmp_path / "secret").write_bytes(b"outside")
    return d


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def test_serves_directory_and_deferred_images(images: Path) -> None:
    pages = os.urandom(5 << 20)  # five times what the pipe holds

    with streamer.Streamer(images, {"pages-1.img": lambda fd: write_all(fd, pages)}) as s:
        criu = FakeCriu(images)
        assert criu.read("inventory.img") == b"inv" * 1000
        assert criu.read("pages-1.img", pace=0.0001) == pages
        assert criu.read("tmpfs-dev-41.tar.gz.img") == (images / "tmpfs-dev-41.tar.gz.img").read_bytes()
        assert criu.read("netns-10.img") is None  # CRIU asks for images that may not exist
        criu.close()
    assert s.errors == []
    assert not (images / streamer.SOCKET).exists()


@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "a/../inventory.img", ".", "..", "", "x\0y"])
def test_names_outside_the_directory_do_not_exist(images: Path, name: str) -> None:
    with streamer.Streamer(images, {}):
        criu = FakeCriu(images)
        assert criu.read(name) is None
        assert criu.read("inventory.img") == b"inv" * 1000  # and the conversation goes on
        criu.close()


def test_failing_writer_cuts_the_image_short_and_is_kept(images: Path) -> None:
    class Damaged(Exception):
        pass

    def good_then_damaged(fd: int) -> None:
        write_all(fd, b"good part")
        raise Damaged("chunk 3 is corrupt")

    with streamer.Streamer(images, {"pages-1.img": good_then_damaged}) as s:
        criu = FakeCriu(images)
        assert criu.read("pages-1.img") == b"good part"  # EOF early: CRIU fails the restore
        criu.close()
    assert [type(e) for e in s.errors] == [Damaged]


def test_writer_stops_when_criu_stops_reading(images: Path) -> None:
    """CRIU gone part-way: the writer's next write fails (its source stops, DeferredFile.write_to),
    the error is kept, and the streamer closes without waiting on it."""

    def endless(fd: int) -> None:
        while True:
            write_all(fd, bytes(1 << 20))

    with streamer.Streamer(images, {"pages-1.img": endless}) as s:
        criu = FakeCriu(images)
        req = img_streamer_pb2.img_streamer_request_entry(filename="pages-1.img").SerializeToString()
        criu.sock.sendall(struct.pack("=I", len(req)) + req)
        criu._exactly(struct.unpack("=I", criu._exactly(4))[0])
        r, w = os.pipe()
        socket.send_fds(criu.sock, [b"\0"], [w])
        os.close(w)
        os.read(r, 4096)
        os.close(r)  # CRIU failed and went away
        criu.close()
    assert [type(e) for e in s.errors] == [BrokenPipeError]


def test_closes_cleanly_when_criu_never_came_or_died(images: Path) -> None:
    with streamer.Streamer(images, {}) as s:  # runc failed before CRIU connected
        pass
    assert s.errors == []
    with streamer.Streamer(images, {}) as s:
        criu = FakeCriu(images)
        criu.sock.sendall(struct.pack("=I", 40))  # CRIU dies in the middle of a request
        criu.close()
    assert s.errors == []


def test_supported_only_with_the_patched_criu(tmp_path: Path) -> None:
    def fake(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\nprintf '{text}'\n")
        path.chmod(0o755)
        return str(path)

    assert streamer.supported(fake("patched", f"Version: 4.1.1\\nGitID: v4.1.1{streamer.CRIU_MARK}\\n"))
    assert not streamer.supported(fake("stock", "Version: 4.1.1\\n"))
    assert not streamer.supported(str(tmp_path / "no-such-criu"))

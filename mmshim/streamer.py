"""Serves a checkpoint's images to `runc restore` over CRIU's image-streamer protocol.

With `stream` in its configuration file, CRIU does not open images: it asks for each one on the
Unix socket `streamer-serve.sock` in the images directory. A request is a u32 length and an
img_streamer_request_entry naming the file; the reply (same framing) says whether it exists; if
it does, CRIU sends the write end of a pipe (SCM_RIGHTS) and reads the image from the other end.
Page images are written into their pipes by the store (DeferredFile.write_to) as they download
and verify, so the download overlaps CRIU's restore instead of preceding it; the other images are
sent from the fetched directory.
runc talks to CRIU over RPC, which needs install/criu-rpc-stream.patch (see `supported`).
"""

import contextlib
import fcntl
import logging
import os
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("mmshim.streamer")
SOCKET = "streamer-serve.sock"
CRIU_MARK = "+mmshim-rpc-stream"  # in `criu --version`'s GitID when built by install/setup-host.sh
# The default 64 KiB costs a context switch per 64 KiB of memory restored. Measured here (2 GiB,
# streamed restore, 6 rounds each against 1 MiB): 256 KiB 1.39 s, 1 MiB 1.27-1.35 s, and above
# pipe-max-size (1 MiB) it falls off a cliff: 2 MiB and 8 MiB 3.8 s.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")

Source = Callable[[int], None]  # writes one image's data into a pipe (DeferredFile.write_to)


def supported(criu: str) -> bool:
    """Whether this CRIU serves RPC restores (runc's) from a streamer: only the patched build does;
    an unpatched one aborts (BUG) as soon as it reads `stream` from the configuration file."""
    try:
        out = subprocess.run([criu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return CRIU_MARK in out


class Streamer:
    """Answers CRIU's requests for images in ``images`` until closed.

    ``deferred`` maps image names to the sources of their data (the store's verified chunks);
    every other image is sent from the directory. ``errors`` keeps what went wrong in
    each writer (a damaged chunk, CRIU closing its end early), for the caller to tell why a
    restore failed.
    """

    def __init__(self, images: Path, deferred: dict[str, Source]) -> None:
        self.images = images
        self.deferred = deferred
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._conn: socket.socket | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)

    def __enter__(self) -> "Streamer":
        with contextlib.suppress(FileNotFoundError):
            (self.images / SOCKET).unlink()
        dfd = os.open(self.images, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:  # through /proc: a socket path may not exceed 107 bytes, a work dir may
            self._listener.bind(f"/proc/self/fd/{dfd}/{SOCKET}")
        finally:
            os.close(dfd)
        self._listener.listen(1)
        self._spawn(self._serve, "streamer")
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in (self._listener, self._conn):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes accept() and recv()
        for t in list(self._threads):
            t.join(timeout=30)
            if t.is_alive():  # CRIU left a pipe open and unread: do not hang the runtime on it
                log.warning("image streamer thread %s still blocked; leaving it", t.name)
        self._listener.close()
        if self._conn is not None:
            self._conn.close()
        with contextlib.suppress(OSError):
            (self.images / SOCKET).unlink()

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _serve(self) -> None:
        try:
            from pycriu.images import img_streamer_pb2  # here: its 60 ms overlap runc's start

            self._conn, _ = self._listener.accept()
            while (name := self._request(self._conn)) is not None:
                exists = name in self.deferred or (
                    _NAME_RE.fullmatch(name) is not None and (self.images / name).is_file()
                )
                reply = img_streamer_pb2.img_streamer_reply_entry(exists=exists).SerializeToString()
                self._conn.sendall(struct.pack("=I", len(reply)) + reply)
                if exists:
                    _, fds, _, _ = socket.recv_fds(self._conn, 1, 1)
                    if len(fds) != 1:
                        raise OSError(f"CRIU sent no pipe for {name}")
                    self._spawn(self._write, f"image:{name}", name, fds[0])
        except OSError as e:  # CRIU gone, or we were closed
            log.debug("image streamer stopped: %s", e)
        except BaseException as e:
            self.errors.append(e)

    @staticmethod
    def _request(conn: socket.socket) -> str | None:
        """The next file name CRIU asks for; None when it hangs up."""
        head = _recv_exactly(conn, 4)
        if head is None:
            return None
        body = _recv_exactly(conn, struct.unpack("=I", head)[0])
        if body is None:
            return None
        from pycriu.images import img_streamer_pb2

        req = img_streamer_pb2.img_streamer_request_entry()
        req.ParseFromString(body)
        return req.filename

    def _write(self, name: str, fd: int) -> None:
        try:
            with contextlib.suppress(OSError):  # a smaller pipe is only slower
                fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
            if name in self.deferred:
                self.deferred[name](fd)
            else:
                with open(self.images / name, "rb") as f:
                    while os.splice(f.fileno(), fd, PIPE_SIZE):
                        pass
        except BaseException as e:
            log.warning("image %s not served: %s", name, e)
            self.errors.append(e)
        finally:
            os.close(fd)


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        more = conn.recv(n - len(buf))
        if not more:
            return None
        buf += more
    return buf

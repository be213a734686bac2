"""The checkpoint engine: whole-container checkpoints (runc + CRIU + writable layer + mounts).

A checkpoint holds what a restore on a NEW host needs: CRIU's images, the overlay writable layer
(CRIU does not carry it) and the contents of chosen bind mounts such as Docker's /dev/shm. The
container is paused while the layer is captured and CRIU dumps, so the three are consistent; it
resumes as soon as CRIU is done. Big files of the layer that the job left alone for a minute are
only pinned while it is paused, and read into the store after (checked unchanged: one the job
wrote to first is copied paused in a second attempt), never copied to the work dir; those
unchanged since the job's last checkpoint on this boot are not read at all (its chunks are
reused, unchanged_files).
The upload reads, hashes and compresses the images while CRIU writes them, but writes nothing to
the store until the container runs again (store.Gate). The work dir is the store's scratch
(Store.save's release): a file store on its file system takes a page image of memory that does
not compress whole, as a pack, instead of copying it.
"""

import contextlib
import errno
import functools
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path

from mmshim import layer, streamer
from mmshim.config import Settings
from mmshim.store import CheckpointInfo, CheckpointUnusable, Chunk, Gate, Store, StoreError

log = logging.getLogger("mmshim.engine")
CRIU_CONFIG_ANNOTATION = "org.criu.config"
UPLOAD_NICE_WHILE_FROZEN = 19
# Files of the writable layer whose ctime is older than this are read after the resume (see
# layer.start_capture): longer than the kernel takes to write back a page dirtied through a
# shared mapping (30 s by default), after which the next write through it moves the ctime.
LAYER_COLD_SECONDS = 60.0
LAYER_TAR = "rootfs.tar"
CPUINFO = "criu/cpuinfo.img"
# CRIU's own default CPU checks, named so that they happen: without a cpu-cap option (runc passes
# none) CRIU neither describes the CPU in the image nor checks anything on restore, and a job whose
# libc chose AVX-512 code on one host is restored on a host without it and dies of SIGILL. fpu:
# the xsave features and frame sizes must match; ins: the new CPU has every instruction set the
# old one had.
CPU_CAP = "fpu,ins"


def boot_id() -> str:
    """This boot of this host: inode numbers (layer.identity_key) mean nothing beyond it."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def unchanged_files(store: Store, job_id: str, boot: str) -> dict[str, list[Chunk]]:
    """Cold layer files of the job's last good checkpoint, if taken on this boot with this chunk
    size: identity_key -> the chunks that hold their whole chunks. A file that still has that
    key has that data, so the next capture leaves it out and the save names these chunks."""
    try:
        prev = store.latest_good(job_id)
        captured = (prev.meta.get("layer") or {}) if prev is not None else {}
        if prev is None or prev.meta.get("boot_id") != boot or captured.get("align") != store.chunk_size:
            return {}
        chunks = store.chunks_of(job_id, prev.checkpoint_id, LAYER_TAR)
        out = {}
        for key, (index, count) in (captured.get("aligned") or {}).items():
            part = chunks[index : index + count] if index >= 0 else []
            if count > 0 and len(part) == count and all(raw == store.chunk_size for _, raw, _ in part):
                out[key] = part
        return out
    except (StoreError, CheckpointUnusable, TypeError, ValueError) as e:  # only costs a full copy
        log.warning("cannot reuse the layer files of %s's last checkpoint: %s", job_id, e)
        return {}


def set_priority(nice: int) -> None:
    """Give every thread of this process the same nice value (Linux keeps one per thread)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


class _Passed(Exception):
    """A checkpoint this host cannot run: restore goes on to the previous one."""


class EngineError(Exception):
    pass


class Runc:
    """runc with the global flags containerd gave us (same --root, --log, --criu, ...)."""

    def __init__(self, runc: str, global_argv: list[str], root: str) -> None:
        self.runc = runc
        self.global_argv = global_argv
        self.root = root

    def run(self, *args: str, inherit_stdio: bool = False) -> None:
        kw: dict = {} if inherit_stdio else {"stdin": subprocess.DEVNULL, "capture_output": True}
        proc = subprocess.run([self.runc, *self.global_argv, *args], text=True, close_fds=False, **kw)
        if proc.returncode != 0:
            lines = [] if inherit_stdio else (proc.stderr or "").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""  # inherited stdio: runc's error went there
            raise EngineError(f"runc {args[0]} failed ({proc.returncode}){detail}")

    def state(self, container_id: str) -> dict | None:
        proc = subprocess.run(
            [self.runc, "--root", self.root, "state", container_id], capture_output=True, text=True
        )
        return json.loads(proc.stdout) if proc.returncode == 0 else None


def remove_later(*paths: Path) -> None:
    """Delete staging directories off the caller's path. Freeing a few GiB of page images takes
    ext4 up to 0.4 s per GiB, and the checkpoint is committed already. Not a daemon thread: the
    process finishes it before it exits."""

    def remove() -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)

    threading.Thread(target=remove, name="remove-staging").start()


def bind_sources(spec: dict, paths: tuple[str, ...]) -> dict[str, str]:
    """Host sources of the chosen container paths that are bind mounts (tmpfs ones CRIU dumps itself)."""
    out = {}
    for mount in spec.get("mounts") or []:
        dest = mount.get("destination")
        if dest in paths and {"bind", "rbind"} & set(mount.get("options") or []):
            out[dest] = mount["source"]
    return out


def rootfs_of(spec: dict, bundle: str) -> str:
    root = (spec.get("root") or {}).get("path") or "rootfs"
    return root if os.path.isabs(root) else os.path.join(bundle, root)


@functools.cache
def versions(runc: str, criu: str) -> dict:
    """Kernel, runc and CRIU versions, for a checkpoint's metadata (once per process: they do not
    change under a running watcher)."""

    def first_line(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "unknown"

    return {
        "kernel": platform.release(),
        "runc": first_line([runc, "--version"]),
        "criu": first_line([criu, "--version"]),
    }


@functools.cache
def cpuinfo_image(criu: str) -> bytes | None:
    """This host's CPU as CRIU describes it (`criu cpuinfo dump`), put into every checkpoint taken
    here (once per process: the CPU does not change under a running watcher); None where CRIU
    has no such description (aarch64: it exits with -ENOTSUP)."""
    with tempfile.TemporaryDirectory(prefix="mmshim-cpu-") as d:
        status, said = criu_cpuinfo(criu, "dump", Path(d))
        if status == 256 - errno.ENOTSUP:
            return None
        if status != 0:
            raise EngineError(f"criu cpuinfo dump failed ({status}): {said}")
        image = Path(d, "cpuinfo.img")
        return image.read_bytes() if image.exists() else None


def criu_cpuinfo(criu: str, action: str, images: Path) -> tuple[int, str]:
    """`criu cpuinfo dump|check` with CPU_CAP on an images dir: its exit status and what it logged
    (a log file "-" is CRIU's stdout)."""
    argv = [criu, "cpuinfo", action, f"--cpu-cap={CPU_CAP}", "--images-dir", str(images), "--log-file", "-"]
    r = subprocess.run(argv, capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr).strip()


def image_of(spec: dict, container_id: str) -> str | None:
    """The id of the image Docker made the container from: the hash of the image's config, the
    same on every host that pulled it. Read from Docker's config.v2.json of the container, in the
    directory Docker mounts /etc/hostname from (whatever its data-root). None for a container
    Docker did not make, or whose config cannot be read (logged)."""
    for mount in spec.get("mounts") or ():
        directory = os.path.dirname(str(mount.get("source") or ""))
        if mount.get("destination") != "/etc/hostname" or os.path.basename(directory) != container_id:
            continue
        try:
            with open(os.path.join(directory, "config.v2.json"), "rb") as f:
                image = json.load(f).get("Image")
        except (OSError, ValueError, AttributeError) as e:
            log.warning("cannot read the image id of %s from %s: %s", container_id, directory, e)
            return None
        return image if isinstance(image, str) and image else None
    return None


def recorded_spec(spec: dict) -> dict:
    """The OCI spec as a checkpoint records it: the environment's names without their values,
    which may be secrets (the viewer shows a checkpoint's metadata)."""
    process = spec.get("process") or {}
    names = [str(entry).split("=", 1)[0] for entry in process.get("env") or ()]
    return {**spec, "process": {**process, "env": names}}


def container_misfit(meta: dict, spec: dict, image: str | None) -> str | None:
    """Why a checkpoint does not fit the new container, or None: another command, a bind mount
    whose contents it carries and the container lacks, or another image. Its layer diff and the
    files its processes map only make sense on the image it was taken on, and a tag pushed again
    between two attempts (`:latest`) names another. An image unknown on either side is not
    checked."""
    args = (spec.get("process") or {}).get("args")
    if meta.get("args") != args:
        return f"its command was {meta.get('args')}, this container runs {args}"
    mounts = tuple(meta.get("mounts") or ())
    missing = sorted(set(mounts) - set(bind_sources(spec, mounts)))
    if missing:
        return f"this container lacks the bind mounts {missing}"
    there = meta.get("image")
    if there and image and there != image:
        return f"taken on image {there}, this container's is {image}"
    return None


def cpu_misfit(criu: str, images: Path, meta: dict) -> str | None:
    """Why this host cannot run a checkpoint's processes, or None: another architecture, or a CPU
    that CRIU's own check of the checkpoint's cpuinfo.img refuses (CPU_CAP). Asked before anything
    big is fetched; such a checkpoint stays good for a host like the one it was taken on."""
    here, there = platform.machine(), meta.get("machine")
    instance = meta.get("instance")
    kind = instance.get("instance-type") if isinstance(instance, dict) else None
    on = f" on a {kind}" if kind else ""
    if there and there != here:
        return f"taken on {there}{on}, this host is {here}"
    if not (images / "cpuinfo.img").exists():
        return None  # taken before checkpoints described their CPU: unchecked, as before
    status, said = criu_cpuinfo(criu, "check", images)
    if status == 0:
        return None
    errors = [line.strip() for line in said.splitlines() if "Error (" in line] or [said]
    return f"this host's CPU cannot run what was checkpointed{on}; CRIU: {' | '.join(errors)}"


def criu_stats(images: Path) -> dict:
    """Frozen time and pages written from CRIU's own stats-dump (microseconds → seconds)."""
    try:
        import pycriu.images

        with open(images / "stats-dump", "rb") as f:
            dump = pycriu.images.load(f)["entries"][0]["dump"]
    except Exception as exc:  # stats are informative only
        log.warning("no CRIU stats: %s", exc)
        return {}
    return {
        "frozen_s": dump.get("frozen_time", 0) / 1e6,
        "memdump_s": dump.get("memdump_time", 0) / 1e6,
        "pages_written": dump.get("pages_written", 0),
    }


def checkpoint(
    runc: Runc,
    container_id: str,
    store: Store,
    job_id: str,
    meta: dict,
    settings: Settings,
    progress: Callable[[int], None] | None = None,
    urgent: bool = False,
    copy_now: Collection[tuple[int, int]] = (),
) -> CheckpointInfo:
    """Checkpoint a running container, leaving it running; the manifest is committed last.

    ``progress`` gets the upload's running total of raw bytes (Store.save). Chunks are written
    to the store once the container runs again, which keeps its freeze short; an ``urgent``
    checkpoint (the Spot notice: the host goes in two minutes, the freeze no longer matters)
    writes them while CRIU dumps, and so commits sooner.
    A big layer file the job left alone for a minute is read by the upload after the resume;
    one the job writes to before that read (a log appended every few minutes, say) fails that
    attempt only: the checkpoint is taken again at once with those files (``copy_now``: their
    st_dev, st_ino) copied frozen, and its metadata says why (``retried``).
    """
    given = meta  # the caller's, for a second attempt
    criu = criu_of(runc)
    cpuinfo = cpuinfo_image(criu)
    state = runc.state(container_id)
    if not state or state.get("status") != "running":
        raise EngineError(f"container {container_id} is not running")
    bundle = state["bundle"]
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    rootfs = rootfs_of(spec, bundle)
    os.makedirs(settings.workdir, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix="ckpt-", dir=settings.workdir))
    work = Path(str(stage) + "-work")
    meta = {
        **meta,
        "container_id": container_id,
        "host": socket.gethostname(),
        "args": (spec.get("process") or {}).get("args"),
        "image": image_of(spec, container_id),
        "spec": recorded_spec(spec),
        "versions": versions(runc.runc, criu),
        "urgent": urgent,
        "boot_id": boot_id(),
        "machine": platform.machine(),
    }
    unchanged = unchanged_files(store, job_id, meta["boot_id"])
    timings: dict[str, float] = {}
    meta["timings"] = timings  # filled in while the upload runs; the manifest is written last
    done, abort, resumed = threading.Event(), threading.Event(), Gate()
    result: dict = {}
    reuse: dict[str, dict[int, Chunk]] = {}
    borrowed: dict[str, layer.Capture] = {}

    def upload() -> None:
        # While CRIU dumps, the container is frozen: the upload (hashing, compression) must not
        # take CPU from CRIU. Its threads inherit this nice value; set_priority restores it.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICE_WHILE_FROZEN)
        try:
            result["info"] = store.save(
                job_id,
                stage,
                meta,
                done=done,
                progress=progress,
                abort=abort,
                gate=resumed,
                reuse=reuse,
                release=True,
                borrowed=borrowed,
            )
        except Exception as exc:
            result["error"] = exc

    uploader = threading.Thread(target=upload, name="upload")
    captured: layer.Capture | None = None
    t0 = time.monotonic()
    try:
        if cpuinfo is not None:  # CRIU leaves it alone: runc asks for no CPU description
            (stage / "criu").mkdir()
            (stage / CPUINFO).write_bytes(cpuinfo)
        runc.run("pause", container_id)
        try:
            upper = layer.upperdir_of(rootfs)
            work.mkdir(exist_ok=True)
            # The data of big files the job has not touched for a while (staged inputs) is read by
            # the upload once the container runs again, so the freeze does not grow with the layer
            # and the work dir needs no room for it; at a Spot notice everything is copied now, as
            # nothing may then make the checkpoint fail. Those unchanged since the last checkpoint
            # are not read at all.
            captured = layer.start_capture(
                upper or rootfs,
                str(stage / LAYER_TAR),
                settings.layer_cap,
                diff=bool(upper),
                cold_after=LAYER_COLD_SECONDS,
                tmp_dir=str(work),
                align=store.chunk_size,
                pin=not urgent,
                unchanged=unchanged.keys(),
                copy_now=copy_now,
            )
            borrowed[LAYER_TAR] = captured
            reuse[LAYER_TAR] = {
                index + i: chunk
                for key, index in captured.reused.items()
                for i, chunk in enumerate(unchanged[key])
            }
            sources = bind_sources(spec, settings.mounts)
            meta["mounts"] = list(sources)
            (stage / "mounts").mkdir()
            for i, source in enumerate(sources.values()):
                layer.capture_tree(
                    source, str(stage / "mounts" / f"{i}.tar"), settings.mount_cap, store.chunk_size
                )
            timings["layer_s"] = time.monotonic() - t0
            if urgent:
                resumed.open()
            uploader.start()
            try:
                runc.run(
                    "checkpoint",
                    "--leave-running",
                    "--file-locks",
                    "--tcp-established",
                    "--image-path",
                    str(stage / "criu"),
                    "--work-path",
                    str(work),
                    container_id,
                )
            except EngineError as e:
                raise criu_failed(e, work / "dump.log") from e
        finally:
            runc.run("resume", container_id)
            timings["paused_s"] = time.monotonic() - t0
            set_priority(os.getpriority(os.PRIO_PROCESS, 0))  # the upload may have the CPU now
            resumed.open()
        meta["layer"] = captured.publish()
        meta.update(criu_stats(work))  # CRIU writes stats-dump to the work dir
        (stage / "logs").mkdir()
        if (work / "dump.log").exists():
            shutil.copy(work / "dump.log", stage / "logs" / "dump.log")
    except BaseException:
        abort.set()
        raise
    finally:
        resumed.open()  # also when resume failed: the save waits for it
        done.set()
        if uploader.is_alive():
            uploader.join()
        if captured is not None:
            if "error" in result:  # a pinned file cut short fails a read first: the change is why
                try:
                    captured.check()
                except layer.LayerChanged as e:
                    result["error"] = e
            captured.close()  # after the upload, which reads the pinned files
        remove_later(stage, work)
    error = result.get("error")
    if isinstance(error, layer.LayerChanged) and not copy_now:
        log.warning("upload failed: %s; checkpointing again, the files that changed copied frozen", error)
        again = {**given, "retried": f"upload failed: {error}"}
        return checkpoint(runc, container_id, store, job_id, again, settings, progress, urgent, error.inodes)
    if error is not None:
        raise EngineError(f"upload failed: {error}") from error
    return result["info"]


STREAMED = re.compile(r"criu/pages-\d+\.img")  # page images: nearly all of a checkpoint's bytes


def criu_failed(
    error: EngineError, log: Path, served: list[BaseException] | None = None, limit: int = 3
) -> EngineError:
    """runc's error with what else went wrong: the image streamer's errors (a store gone in the
    middle of a restore; CRIU closing its pipes is not a cause) and the last errors in CRIU's
    log (runc's own message only names the log, which goes with the work dir)."""
    causes = [
        f"image not served: {type(x).__name__}: {x}"
        for x in served or []
        if not isinstance(x, BrokenPipeError)
    ]
    lines: deque[str] = deque(maxlen=limit)
    with contextlib.suppress(OSError), open(log, errors="replace") as f:
        lines.extend(line.strip() for line in f if "Error (" in line)
    if lines:
        causes.append(f"CRIU's log: {' | '.join(lines)}")
    return EngineError("; ".join([str(error), *causes])) if causes else error


def criu_of(runc: Runc) -> str:
    """The CRIU that runc runs (its --criu global flag, else `criu` on PATH), found as runc would
    find it. EngineError if there is none: a checkpoint then fails before it pauses the job, a
    restore before it downloads anything, and the checkpoints stay good for a host that has one."""
    name, argv = "criu", runc.global_argv
    for i, arg in enumerate(argv):
        if arg == "--criu" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--criu="):
            name = arg.split("=", 1)[1]
    path = shutil.which(name)
    if path is None:
        where = f"{name} on PATH ({os.environ.get('PATH', '')})" if os.sep not in name else name
        raise EngineError(
            f"CRIU not found: runc would run {where}, not an executable file "
            "(install/setup-host.sh installs CRIU; runc's --criu flag names another)"
        )
    return path


def restore(
    runc: Runc,
    container_id: str,
    bundle: str,
    pid_file: str | None,
    spec: dict,
    store: Store,
    job_id: str,
    settings: Settings,
    checkpoint_id: str | None = None,
    progress: Callable[[int], None] | None = None,
    timings: dict[str, float] | None = None,
    unfit: dict[str, str] | None = None,
) -> CheckpointInfo | None:
    """Restore the job's newest good checkpoint in place of `runc create`; None: nothing to restore.

    With ``checkpoint_id`` that checkpoint instead (no fallback: the operator chose it; a missing
    or damaged one raises CheckpointUnusable). ``progress`` gets the running total of bytes
    restored; ``timings`` the seconds of each phase (fetch_s, apply_s, runc_restore_s). With a
    CRIU that can (streamer.supported), page images are not fetched first but streamed into
    `runc restore` as they download; a damaged chunk found then fails that restore, marks its
    checkpoint bad and the previous one is tried, as a damage found by a fetch would be. A
    checkpoint of another command, mounts or image (container_misfit) or that this host cannot run
    (cpu_misfit) is passed over before its bulk is fetched, and left good (``unfit`` gets its id
    and why); when no other is left, EngineError says why. On any failure the bundle's rootfs
    and config are put back as they were, so a plain create can follow.
    """
    criu = criu_of(runc)
    stream = settings.restore_stream and streamer.supported(criu)
    if settings.restore_stream and not stream:
        log.info("%s cannot stream images to runc (install/criu-rpc-stream.patch): fetching first", criu)
    timings = {} if timings is None else timings
    tried: set[str] = set()
    unfit = {} if unfit is None else unfit
    image = image_of(spec, container_id)

    def attempt() -> CheckpointInfo | None:
        t0 = time.monotonic()
        os.makedirs(settings.workdir, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="restore-", dir=settings.workdir))
        rootfs = rootfs_of(spec, bundle)
        config = Path(bundle) / "config.json"
        original_config = config.read_bytes()
        applied, kept = False, None
        done: dict[str, int] = {}

        def report(name: str) -> Callable[[int], None]:
            def add(total: int) -> None:
                done[name] = total
                if progress is not None:
                    progress(sum(done.values()))

            return add

        try:
            # Which checkpoint, and can this image and host run it? Only its CPU description is fetched.
            skip = tried | unfit.keys()  # damaged ones whose bad mark could not be written too
            info = fetch(store, job_id, str(dest), checkpoint_id, None, lambda n: n != CPUINFO, skip)
            if info is None:
                timings["fetch_s"] = time.monotonic() - t0
                if unfit:
                    raise EngineError(
                        "no checkpoint of this job can be restored here: "
                        + "; ".join(f"{cid}: {why}" for cid, why in unfit.items())
                    )
                return None
            misfit = container_misfit(info.meta, spec, image) or cpu_misfit(criu, dest / "criu", info.meta)
            if misfit:
                unfit[info.checkpoint_id] = misfit
                if checkpoint_id is not None:
                    raise EngineError(f"checkpoint {checkpoint_id} cannot be restored here: {misfit}")
                log.warning("checkpoint %s cannot be restored here: %s", info.checkpoint_id, misfit)
                raise _Passed
            tried.add(info.checkpoint_id)
            defer = (lambda name: STREAMED.fullmatch(name) is not None) if stream else None
            info = store.fetch(job_id, info.checkpoint_id, str(dest), report(""), defer)
            timings["fetch_s"] = time.monotonic() - t0
            sources = bind_sources(spec, tuple(info.meta.get("mounts") or ()))
            lowers = layer.lowerdirs_of(rootfs)
            if not lowers:  # a plain directory: its image kept to undo the apply with
                kept = layer.keep_image(rootfs)
                lowers = [kept]
            applied = True
            # The archives are consumed: the layer needs room once, not twice, on the host's disk.
            layer.apply_diff(str(dest / LAYER_TAR), rootfs, consume=True)
            for i, mount in enumerate(info.meta.get("mounts") or ()):
                layer.apply_tree(str(dest / "mounts" / f"{i}.tar"), sources[mount], consume=True)
            criu_options = ["tcp-close"] if settings.tcp == "close" else []
            criu_options += ["stream"] if info.deferred else []
            criu_options += [f"cpu-cap={CPU_CAP}"] if (dest / CPUINFO).exists() else []
            restore_spec = dict(spec)
            if criu_options:
                conf = dest / "criu.conf"
                conf.write_text("".join(f"{o}\n" for o in criu_options))
                restore_spec["annotations"] = {
                    **(spec.get("annotations") or {}),
                    CRIU_CONFIG_ANNOTATION: str(conf),
                }
            config.write_text(json.dumps(restore_spec))
            timings["apply_s"] = time.monotonic() - t0 - timings["fetch_s"]
            argv = [
                "restore",
                "--detach",
                "--bundle",
                bundle,
                "--image-path",
                str(dest / "criu"),
                "--work-path",
                str(dest / "work"),
                "--file-locks",
            ]
            if settings.tcp == "established":
                argv.append("--tcp-established")
            if pid_file:
                argv += ["--pid-file", pid_file]
            t1 = time.monotonic()
            streams = {
                name.removeprefix("criu/"): functools.partial(f.write_to, progress=report(name))
                for name, f in info.deferred.items()
            }
            images = streamer.Streamer(dest / "criu", streams) if streams else None
            with images or contextlib.nullcontext():
                try:
                    runc.run(*argv, container_id, inherit_stdio=True)
                except EngineError as e:
                    errors = images.errors if images else []
                    damage = [x for x in errors if isinstance(x, CheckpointUnusable)]
                    if damage:
                        raise damage[0] from e
                    raise criu_failed(e, dest / "work" / "restore.log", errors) from e
            timings["runc_restore_s"] = time.monotonic() - t1
            return info
        except BaseException:
            if applied:
                undo(runc, container_id, rootfs, dest, lowers)
            raise
        finally:
            config.write_bytes(original_config)
            shutil.rmtree(dest, ignore_errors=True)
            if kept:
                shutil.rmtree(kept, ignore_errors=True)

    while True:
        try:
            return attempt()
        except _Passed:
            continue
        except CheckpointUnusable as e:
            if checkpoint_id is not None:
                raise
            log.warning("checkpoint unusable, trying the previous one: %s", e)


def fetch(
    store: Store,
    job_id: str,
    dest: str,
    checkpoint_id: str | None = None,
    progress: Callable[[int], None] | None = None,
    defer: Callable[[str], bool] | None = None,
    skip: Collection[str] = (),
) -> CheckpointInfo | None:
    """What restore fetches: the chosen checkpoint (no fallback), else the newest good one."""
    if checkpoint_id is not None:
        return store.fetch(job_id, checkpoint_id, dest, progress, defer)
    return store.fetch_latest(job_id, dest, progress, defer, skip)


def undo(runc: Runc, container_id: str, rootfs: str, dest: Path, lowers: list[str]) -> None:
    """Leave no half-restored container and give the rootfs back its image state (``lowers``:
    the overlay's image layers, or the plain directory's kept image)."""
    subprocess.run([runc.runc, *runc.global_argv, "delete", "--force", container_id], capture_output=True)
    if (dest / LAYER_TAR).exists():
        layer.revert_diff(str(dest / LAYER_TAR), rootfs, lowers)

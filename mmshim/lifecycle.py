"""The create/start/delete interception: the one place where mmshim decides to differ from runc.

Each runc call is one process phase, as in containerd's runc shim: `create` reads the bundle once
and decides (plain create, or restore in its place) and starts the watcher; `start` is a no-op
after a restore; `delete` passes through (the watcher sees the container go by itself).

Attempt 1 of a protected job is the common case and must cost almost nothing: it uses only the
standard library, no store and no config file (the watcher, detached, does the rest). Only a
retry, which may restore, pays for boto3 and the engine.
"""

import _json  # the C half of json: `import json` pulls in re, enum and more (10 ms per create)
import os
import sys
import time

from mmshim.runtime import Invocation, exec_runc, report_error


class _JsonContext:
    """What _json's scanner needs; the same defaults as json.loads."""

    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int

    @staticmethod
    def parse_constant(name: str) -> float:
        return float(name.lower().replace("infinity", "inf"))


def json_loads(text: str) -> object:
    """json.loads for the create path, without importing json (unless the text is not JSON)."""
    text = text.strip()
    try:
        value, end = _json.make_scanner(_JsonContext())(text, 0)
        if end == len(text):
            return value
    except (StopIteration, SystemError):  # _json raises its errors through json.decoder, not loaded
        pass
    import json

    return json.loads(text)  # raises json's own error, with its message


def json_dumps(value: object) -> str:
    """json.dumps of the flat values this module writes (str, int, float, None, list of str)."""
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if value is None:
        return "null"
    if isinstance(value, bool | int | float):
        return repr(value).lower() if isinstance(value, bool) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(json_dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json_dumps(str(k))}: {json_dumps(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__}")


# Kept in runc's own state dir <root>/<id>/, so `runc delete` removes them with the container.
STATE_FILE = "mmshim.json"  # for the watcher: job, attempt, progress carried by a restore
RESTORED_MARK = "mmshim.restored"  # exists only after a restore: `start` must then do nothing
FALSE = ("0", "false", "no", "off")


class Bundle:
    """What mmshim needs from an OCI bundle, read once at `create` (no dataclass: hot path)."""

    def __init__(self, path: str, spec: dict, text: str = "") -> None:
        self.path = path
        self.spec = spec
        self.text = text  # config.json as read: the watcher gets it through a pipe

    @classmethod
    def load(cls, path: str) -> "Bundle":
        config = os.path.join(path, "config.json")
        try:
            with open(config, encoding="utf-8") as f:
                text = f.read()
            spec = json_loads(text)
        except (OSError, ValueError, RecursionError) as exc:
            raise ValueError(f"cannot read bundle config {config}: {exc}") from exc
        if not isinstance(spec, dict):
            raise ValueError(f"bundle config {config} is not a JSON object")
        return cls(path, spec, text)

    @property
    def env(self) -> dict[str, str]:
        process = self.spec.get("process") or {}
        pairs = (item.partition("=") for item in process.get("env") or [] if isinstance(item, str))
        return {key: value for key, _, value in pairs}

    @property
    def terminal(self) -> bool:
        return bool((self.spec.get("process") or {}).get("terminal"))


def state_dir(inv: Invocation) -> str:
    return os.path.join(inv.root, str(inv.container_id))


def job_identity(env: dict[str, str]) -> tuple[str, int] | None:
    """The Batch job a container runs (MMSHIM_JOB_ID for local testing) and its attempt, or None.

    The one reading of these variables, for the create path and mmshim.config alike; a malformed
    attempt counts as 1 (a retry that cannot be recognised starts fresh, it never fails)."""
    job_id = env.get("AWS_BATCH_JOB_ID") or env.get("MMSHIM_JOB_ID")
    if not job_id:
        return None
    try:
        return job_id, int(env.get("AWS_BATCH_JOB_ATTEMPT") or env.get("MMSHIM_JOB_ATTEMPT") or 1)
    except ValueError:
        return job_id, 1


def protection_off(env: dict[str, str]) -> bool:
    return env.get("MMSHIM_PROTECT", "1").lower() in FALSE


def create(inv: Invocation, runc: str) -> None:
    bundle = Bundle.load(inv.bundle)  # an unreadable config.json is reported here, clearly, not by runc
    env = bundle.env
    identity = job_identity(env)
    if identity is None or protection_off(env):
        exec_runc(runc, inv.argv)
    if bundle.terminal:  # the watcher logs it once and records it in the job's events
        try:
            start_watcher(inv, runc, bundle, skip="the container has a TTY, which a restore cannot give back")
        except OSError as exc:  # only the record of why it is not protected is lost
            report_error(inv, f"watcher not started: {exc}")
        exec_runc(runc, inv.argv)
    job_id, attempt = identity
    state = {"job_id": job_id, "attempt": attempt, "restored": None, "progress_base": 0.0}
    if attempt > 1:  # attempt 1 cannot have a checkpoint: no store lookup
        try:
            state.update(restore_in_place(inv, runc, bundle))
        except Exception as exc:  # never fail a job that runc alone would run
            report_error(inv, f"restore skipped: {type(exc).__name__}: {exc}")
    if not state["restored"]:
        status = spawn_wait([runc, *inv.argv])
        if status != 0:
            raise SystemExit(status)
    try:
        state["started"] = time.time()
        os.makedirs(state_dir(inv), exist_ok=True)
        with open(os.path.join(state_dir(inv), STATE_FILE), "w") as f:
            f.write(json_dumps(state))
        start_watcher(inv, runc, bundle, state)
    except OSError as exc:  # the container runs; only its protection is lost
        report_error(inv, f"watcher not started, container not protected: {exc}")
    raise SystemExit(0)


def spawn_wait(argv: list[str]) -> int:
    """Run runc with every fd inherited (stdio, --preserve-fds); posix_spawn: no subprocess import."""
    pid = os.posix_spawn(argv[0], argv, os.environ)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def start_watcher(
    inv: Invocation, runc: str, bundle: Bundle, state: dict | None = None, skip: str | None = None
) -> None:
    """Detached: own session, stdout and stderr on /dev/null; `watcher_main` below closes every
    other fd. Its stdin is a pipe that carries mmshim's state and the bundle's config.json
    (watcher_inputs): containerd deletes both files with the container, and a job that fails as
    it starts is gone before the watcher could read them.

    With `skip`, the watcher only records why the container is not protected, and ends."""
    r, w = os.pipe()
    stdio = [(os.POSIX_SPAWN_DUP2, r, 0)]
    stdio += [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (1, 2)]
    argv = [
        sys.executable,
        "-m",
        "mmshim.lifecycle",
        "--runc",
        runc,
        "--root",
        inv.root,
        "--bundle",
        inv.bundle,
        "--global-argv",
        json_dumps(inv.global_argv),
        *(["--skip", skip] if skip else []),
        str(inv.container_id),
    ]
    try:
        os.posix_spawn(sys.executable, argv, os.environ, file_actions=stdio, setsid=True)
        os.close(r)
        r = -1
        payload = (json_dumps(state) + "\n" + bundle.text).encode()
        with open(w, "wb", closefd=False) as pipe:  # blocks only past the pipe's 64 KiB
            pipe.write(payload)
    except BrokenPipeError:  # the watcher died before it read: nothing is left to tell
        pass
    finally:
        os.close(w)
        if r >= 0:
            os.close(r)


WATCHER_NICE = 10  # the watcher's priority between checkpoints (it checkpoints at normal priority)
WATCHER_DELAY = 1.0  # seconds before the watcher loads its modules: container start-up comes first


def watcher_main() -> None:
    """The detached watcher's first steps, before any heavy import: let go of every inherited fd
    (the container's output ends only when no process holds its pipes), step back in priority,
    take the bundle and the state from the runtime's pipe (start_watcher), and let the
    container's start-up have the CPU; then run mmshim.watcher."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.setpriority(os.PRIO_PROCESS, 0, WATCHER_NICE)
    with open(0, "rb", closefd=False) as pipe:
        inputs = watcher_inputs(pipe.read(), sys.argv[sys.argv.index("--bundle") + 1])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    time.sleep(WATCHER_DELAY)
    from mmshim import watcher

    watcher.main(*inputs)


def watcher_inputs(payload: bytes, bundle_path: str) -> tuple[Bundle | None, dict | None]:
    """The state (None for a `skip` watcher) and the bundle that start_watcher sent: its state as
    one JSON line, then config.json; (None, None) for anything else (the watcher then reads the
    files itself, and says why if they are gone)."""
    head, _, text = payload.decode("utf-8", "replace").partition("\n")
    try:
        state, spec = json_loads(head), json_loads(text)
    except ValueError:
        return None, None
    if not isinstance(spec, dict) or not isinstance(state, dict | None):
        return None, None
    return Bundle(bundle_path, spec, text), state


def restore_in_place(inv: Invocation, runc: str, bundle: Bundle) -> dict:
    """A retry: restore the job's newest good checkpoint in place of `runc create`.

    Returns what the state file records: `restored` is the checkpoint id, or None when there was
    nothing to restore or the restore failed (then the caller runs a plain create; why is logged
    and kept in the job's events).
    """
    import site

    site.main()  # the runtime starts with -IS; a restore needs site-packages (boto3, zstandard)
    import logging

    from mmshim import config, engine, events, store

    job = config.job_from_env(bundle.env, config.load_settings())
    if job is None or not job.settings.protect:
        return {"restored": None}
    cid = str(inv.container_id)
    events.setup_logging(job, cid, "runtime")
    log = logging.getLogger("mmshim.lifecycle")
    t0 = time.monotonic()
    try:
        st = store.open_store(job.settings.store, **job.settings.store_options)
    except Exception as exc:  # a bad store setting: nothing to record the events in either
        log.error("store %s unusable (%s): starting fresh", job.settings.store, exc)
        return {"restored": None}
    rec = events.Recorder(job, cid, st)
    rec.emit("restore.attempted")
    try:
        r = engine.Runc(runc, inv.global_argv, inv.root)
        timings: dict[str, float] = {}
        unfit: dict[str, str] = {}  # checkpoints passed over: this host cannot run them
        info = engine.restore(
            r,
            cid,
            inv.bundle,
            inv.pid_file,
            bundle.spec,
            st,
            job.job_id,
            job.settings,
            timings=timings,
            unfit=unfit,
        )
    except Exception as exc:
        log.exception("restore failed; starting fresh")
        rec.emit("restore.fallback", logging.ERROR, reason=f"{type(exc).__name__}: {exc}")
        return {"restored": None}
    if info is None:
        rec.emit("restore.fallback", reason="no good checkpoint in the store")
        return {"restored": None}
    progress = info.meta.get("progress_s", 0.0)
    rec.emit(
        "restore.succeeded",
        checkpoint_id=info.checkpoint_id,
        duration_s=time.monotonic() - t0,
        progress_s=progress,
        streamed=bool(info.deferred),  # page images went into CRIU while they downloaded
        **timings,
        **({"passed_over": unfit} if unfit else {}),
    )
    with open(os.path.join(state_dir(inv), RESTORED_MARK), "w") as f:
        f.write(info.checkpoint_id)
    return {"restored": info.checkpoint_id, "progress_base": progress}


def start(inv: Invocation, runc: str) -> None:
    if os.path.exists(os.path.join(state_dir(inv), RESTORED_MARK)):
        return  # the process was restored at create and is already running
    exec_runc(runc, inv.argv)


def delete(inv: Invocation, runc: str) -> None:
    exec_runc(runc, inv.argv)


HANDLERS = {"create": create, "start": start, "delete": delete}


def dispatch(inv: Invocation, runc: str) -> None:
    HANDLERS[str(inv.command)](inv, runc)


if __name__ == "__main__":
    watcher_main()

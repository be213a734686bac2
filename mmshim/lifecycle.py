"""The create/start/delete interception: the one place where mmshim decides to differ from runc.

Each runc call is one process phase, as in containerd's runc shim: `create` reads the bundle once
and decides (plain create, or restore in its place); `start` is a no-op after a restore; `delete`
cleans up. Everything that is not a protected Batch job ends in an exec of runc.
"""

import json
import os

from mmshim.runtime import Invocation, exec_runc, report_error

STATE_FILE = "mmshim.json"  # kept in runc's own state dir <root>/<id>/, so `runc delete` removes it


class Bundle:
    """What mmshim needs from an OCI bundle, read once at `create` (no dataclass: hot path)."""

    def __init__(self, path: str, spec: dict) -> None:
        self.path = path
        self.spec = spec

    @classmethod
    def load(cls, path: str) -> "Bundle":
        config = os.path.join(path, "config.json")
        try:
            with open(config, "rb") as f:
                spec = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read bundle config {config}: {exc}") from exc
        if not isinstance(spec, dict):
            raise ValueError(f"bundle config {config} is not a JSON object")
        return cls(path, spec)

    @property
    def env(self) -> dict[str, str]:
        process = self.spec.get("process") or {}
        pairs = (item.partition("=") for item in process.get("env") or [] if isinstance(item, str))
        return {key: value for key, _, value in pairs}

    @property
    def terminal(self) -> bool:
        return bool((self.spec.get("process") or {}).get("terminal"))


def state_path(inv: Invocation) -> str:
    return os.path.join(inv.root, str(inv.container_id), STATE_FILE)


def create(inv: Invocation, runc: str) -> None:
    bundle = Bundle.load(inv.bundle)  # an unreadable config.json is reported here, clearly, not by runc
    env = bundle.env
    if "AWS_BATCH_JOB_ID" in env or "MMSHIM_JOB_ID" in env:
        try:
            protected_create(inv, runc, bundle)
        except Exception as exc:  # never fail a job that runc alone would run
            report_error(inv, f"protection disabled for this container: {type(exc).__name__}: {exc}")
    exec_runc(runc, inv.argv)


def protected_create(inv: Invocation, runc: str, bundle: Bundle) -> None:
    """Restore in place of create when the job has a checkpoint, then start the watcher.

    Returns only to fall back to a plain exec of runc; every problem of mmshim's own ends there,
    loudly logged, so that the job runs as it would have without mmshim.
    """
    import logging
    import site
    import subprocess
    import sys
    import time

    site.main()  # the runtime starts with -IS; only protected jobs need site-packages
    from mmshim import config, engine, events, store

    try:
        job = config.job_from_env(bundle.env, config.load_settings())
    except ValueError as exc:
        sys.stderr.write(f"mmshim: not protecting this container: {exc}\n")
        return
    if job is None or not job.settings.protect:
        return
    cid = str(inv.container_id)
    events.setup_logging(job, cid, "runtime")
    log = logging.getLogger("mmshim.lifecycle")
    if bundle.terminal:
        log.warning("container has a TTY: not checkpointed")
        return
    try:
        st = store.open_store(job.settings.store, **job.settings.store_options)
    except Exception as exc:
        log.error("store %s unavailable: %s", job.settings.store, exc)
        st = None
    rec = events.Recorder(job, cid, st)
    r = engine.Runc(runc, inv.global_argv, inv.root)
    restored = None
    if job.attempt > 1:  # attempt 1 cannot have a checkpoint: no store lookup
        rec.emit("restore.attempted")
        t0 = time.monotonic()
        try:
            if st is None:
                raise engine.EngineError(f"store {job.settings.store} unavailable")
            restored = engine.restore(
                r, cid, inv.bundle, inv.pid_file, bundle.spec, st, job.job_id, job.settings
            )
            if restored is None:
                rec.emit("restore.fallback", reason="no good checkpoint in the store")
        except Exception as exc:
            log.exception("restore failed; starting fresh")
            rec.emit("restore.fallback", logging.ERROR, reason=f"{type(exc).__name__}: {exc}")
        if restored is not None:
            rec.emit(
                "restore.succeeded",
                checkpoint_id=restored.checkpoint_id,
                duration_s=time.monotonic() - t0,
                progress_s=restored.meta.get("progress_s", 0),
            )
    if restored is None:
        proc = subprocess.run([runc, *inv.argv], close_fds=False)
        if proc.returncode != 0:
            sys.exit(proc.returncode)
        rec.emit("start")
    state = {
        "restored": restored is not None,
        "job_id": job.job_id,
        "attempt": job.attempt,
        "progress_base": restored.meta.get("progress_s", 0) if restored else 0,
        "started": time.time(),
    }
    with open(state_path(inv), "w") as f:
        json.dump(state, f)
    subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmshim.watcher",
            "--runc",
            runc,
            "--root",
            inv.root,
            "--bundle",
            inv.bundle,
            "--global-argv",
            json.dumps(inv.global_argv),
            cid,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,
    )
    sys.exit(0)


def start(inv: Invocation, runc: str) -> None:
    if os.path.exists(state_path(inv)):
        with open(state_path(inv)) as f:
            if json.load(f).get("restored"):
                return  # the process was restored at create and is already running
    exec_runc(runc, inv.argv)


def delete(inv: Invocation, runc: str) -> None:
    exec_runc(runc, inv.argv)


HANDLERS = {"create": create, "start": start, "delete": delete}


def dispatch(inv: Invocation, runc: str) -> None:
    HANDLERS[str(inv.command)](inv, runc)

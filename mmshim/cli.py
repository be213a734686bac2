"""mmshimctl: the operator's entry point to checkpoints, the store, the viewer and the IMDS emulator.

A separate executable from the runtime (mmshim stands in for runc; mmshimctl is for people), so its
command names may coincide with runc's. Every command takes the global --config, --store and
--json; failures an operator can act on (store unreachable, bad job id, unknown checkpoint, runc or
CRIU failing) print one line and exit with status 2, never a traceback.

    mmshimctl ls [JOB]                      jobs and their checkpoints
    mmshimctl inspect JOB|JOB/CHECKPOINT    a job's events and checkpoints, or one checkpoint's meta
    mmshimctl rm JOB [CHECKPOINT]           delete a job (checkpoints and events) or one checkpoint
    mmshimctl gc [--grace SECONDS]          delete chunks and packs no checkpoint references
    mmshimctl checkpoint CONTAINER          checkpoint a running container by hand
    mmshimctl restore JOB --bundle B --id ID
    mmshimctl serve                         the web viewer
    mmshimctl imds-emulator ...             python -m mmshim.imds_emulator
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime
import fcntl
import importlib
import json
import logging
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import click

from mmshim import config as cfg
from mmshim import engine, layer, pricing
from mmshim.store import (
    CheckpointInfo,
    CheckpointUnusable,
    InvalidJobId,
    Store,
    StoreError,
    open_store,
    validate_job_id,
)

log = logging.getLogger("mmshim.cli")

EXIT_ERROR = 2
DEFAULT_ROOT = "/run/runc"
GC_GRACE_WARN = 3600.0  # shorter graces can delete the chunks of a checkpoint being saved
CRIU_STATS = ("frozen_s", "memdump_s", "pages_written")
_CID_RE = re.compile(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{6}")


# ---------------------------------------------------------------------------------------------
# Errors


class CliError(click.ClickException):
    """An error for the operator: one line on stderr (a JSON object with --json), exit status 2."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind
        self.as_json = False

    def show(self, file: Any = None) -> None:
        if self.as_json:
            click.echo(json.dumps({"error": self.message, "type": self.kind}), err=True)
        else:
            click.echo(f"mmshimctl: error: {self.message}", err=True)


# What commands may raise that is the operator's to fix, not a bug: shown as one line, exit 2.
OPERATOR_ERRORS: tuple[type[BaseException], ...] = (StoreError, engine.EngineError, layer.LayerError, OSError)


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        as_json = bool(ctx.params.get("as_json"))
        try:
            return super().invoke(ctx)
        except CliError as e:
            e.as_json = as_json
            raise
        except OPERATOR_ERRORS as e:
            err = CliError(_describe(e), type(e).__name__)
            err.as_json = as_json
            raise err from e


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


# ---------------------------------------------------------------------------------------------
# Shared state of one invocation


class Obj:
    """The global options, and the settings and store they lead to (each made once, when needed)."""

    def __init__(
        self,
        ctx: click.Context,
        config_path: str,
        explicit_config: bool,
        store_url: str | None,
        as_json: bool,
    ) -> None:
        self.ctx = ctx
        self.config_path = config_path
        self.explicit_config = explicit_config
        self.store_override = store_url
        self.as_json = as_json
        self._settings: cfg.Settings | None = None
        self._store: Store | None = None

    @property
    def settings(self) -> cfg.Settings:
        if self._settings is None:
            if self.explicit_config and not os.path.exists(self.config_path):
                raise CliError(f"config file {self.config_path} does not exist")
            try:
                self._settings = cfg.load_settings(self.config_path)
            except (ValueError, TypeError) as e:
                raise CliError(f"bad config {self.config_path}: {e}") from e
        return self._settings

    @property
    def store_url(self) -> str:
        return self.store_override or self.settings.store

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.store_url, **self.settings.store_options)
            self.ctx.call_on_close(self._store.close)
        return self._store

    def runc(self, explicit: str | None) -> str:
        """--runc, else $MMSHIM_RUNC, else the config's `runc`, else runc on PATH (never mmshim itself)."""
        if explicit:
            return explicit
        if not os.environ.get("MMSHIM_RUNC"):
            with contextlib.suppress(OSError, tomllib.TOMLDecodeError), open(self.config_path, "rb") as f:
                configured = tomllib.load(f).get("runc")
                if configured:
                    return str(configured)
        from mmshim import runtime

        try:
            return runtime.find_runc()
        except runtime.RuncNotFound as e:
            raise CliError(f"{e} (or pass --runc)") from e

    @property
    def interactive(self) -> bool:
        """Progress meters only for a person watching: stdout a terminal and no --json."""
        return not self.as_json and _isatty(sys.stdout)

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, default=str))
        else:
            human()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Formatting


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d} UTC"


def seconds(v: Any) -> str:
    return f"{v:.3f} s" if isinstance(v, int | float) and not isinstance(v, bool) else "-"


def table(headers: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    click.echo(line(headers))
    for r in rows:
        click.echo(line(r))


def checkpoint_row(info: CheckpointInfo, now: float) -> dict[str, Any]:
    meta = info.meta
    return {
        "job_id": info.job_id,
        "checkpoint_id": info.checkpoint_id,
        "state": info.state,
        "created": info.created,
        "age_s": round(now - info.created, 3),
        "size": info.size,
        "stored": info.stored,
        "trigger": meta.get("trigger"),
        "attempt": meta.get("attempt"),
    }


CHECKPOINT_HEADERS = ["CHECKPOINT", "STATE", "SIZE", "STORED", "AGE", "TRIGGER"]


def checkpoint_cells(row: dict[str, Any]) -> list[str]:
    return [
        row["checkpoint_id"],
        row["state"],
        human_bytes(row["size"]) if row["size"] or row["state"] == "good" else "-",
        human_bytes(row["stored"]) if row["size"] or row["state"] == "good" else "-",
        human_age(row["age_s"]),
        str(row["trigger"] or "-"),
    ]


def print_mapping(data: dict[str, Any], indent: int = 2) -> None:
    """Nested dicts as an indented key: value outline."""
    pad = " " * indent
    width = max((len(str(k)) for k in data), default=0)
    for key, value in data.items():
        if isinstance(value, dict) and value:
            click.echo(f"{pad}{key}:")
            print_mapping(value, indent + 2)
        else:
            if isinstance(value, list):
                text = " ".join(str(v) for v in value) if value else "-"
            elif isinstance(value, dict):
                text = "-"
            else:
                text = str(value)
            click.echo(f"{pad}{str(key).ljust(width)}  {text}")


# ---------------------------------------------------------------------------------------------
# Progress meters (stderr, only when stdout is a terminal)


class Meter:
    """Shows a transfer's running raw byte count; a bar when the total is known.

    The store calls the callback from its worker threads, serialized by its own lock.
    """

    def __init__(self, label: str, total: int | None, enabled: bool, file: Any = None) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.file = file if file is not None else sys.stderr
        self.done = 0
        self._shown = 0.0
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        if self.total:
            self._bar = click.progressbar(
                length=self.total,
                label=self.label,
                file=self.file,
                show_eta=True,
                item_show_func=lambda _: f"{human_bytes(self.done)} of {human_bytes(self.total)}",
            )
            self._bar.__enter__()
        return self.update

    def update(self, done: int) -> None:
        step, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.update(step, done)
            return
        now = time.monotonic()
        if now - self._shown >= 0.1:
            self._shown = now
            self.file.write(f"\r{self.label} {human_bytes(done)}\x1b[K")
            self.file.flush()

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and self._shown:
            self.file.write(f"\r{self.label} {human_bytes(self.done)}\x1b[K\n")
            self.file.flush()


def fetch_meter(store: Store, job_id: str, checkpoint_id: str | None, enabled: bool) -> Meter:
    """restore's meter, labelled with the checkpoint it fetches: the chosen one or the newest good.

    Looked up only when shown. Should the store fall back past a damaged newest one, the count
    starts again under the same label.
    """
    if not enabled:
        return Meter("fetching", None, False)
    if checkpoint_id is None:
        info = store.latest_good(job_id)
    else:
        info = next((i for i in store.checkpoints(job_id) if i.checkpoint_id == checkpoint_id), None)
    if info is None:
        return Meter("fetching", None, True)
    return Meter(f"fetching {info.checkpoint_id}", info.size, True)


# ---------------------------------------------------------------------------------------------
# The command group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    default=cfg.CONFIG_FILE,
    envvar="MMSHIM_CONFIG",
    show_default=True,
    metavar="PATH",
    help="Host config (TOML); also $MMSHIM_CONFIG.",
)
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    help="Store URL (file:///path or s3://bucket/prefix) "
    "instead of the config's; the config's store_options still apply.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (JSON on stdout).")
@click.option("-v", "--verbose", is_flag=True, help="Log mmshim's INFO messages to stderr.")
@click.version_option(package_name="mmshim", prog_name="mmshimctl")
@click.pass_context
def cli(ctx: click.Context, config_path: str, store_url: str | None, as_json: bool, verbose: bool) -> None:
    """Operate mmshim: list, inspect and delete checkpoints, checkpoint and restore containers by
    hand, garbage-collect the store, run the viewer and the IMDS emulator."""
    source = ctx.get_parameter_source("config_path")
    explicit = source not in (None, click.core.ParameterSource.DEFAULT)
    ctx.obj = Obj(ctx, config_path, explicit, store_url, as_json)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            stream=sys.stderr,
            level=logging.INFO if verbose else logging.WARNING,
            format="mmshimctl: %(levelname)s %(name)s: %(message)s",
        )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


pass_obj = click.pass_obj


def job_arg(job_id: str) -> str:
    return validate_job_id(job_id)  # InvalidJobId: a StoreError, so one clean line


def split_target(target: str) -> tuple[str, str | None]:
    """`JOB` or `JOB/CHECKPOINT` (job ids never contain "/")."""
    job, sep, cid = target.partition("/")
    if sep and not cid:
        raise CliError(f"{target!r}: expected JOB or JOB/CHECKPOINT")
    try:
        return job_arg(job), (cid if sep else None)
    except InvalidJobId as e:
        raise CliError(f"{target!r}: {e}" if sep else str(e), "InvalidJobId") from e


def job_exists(store: Store, job: str) -> bool:
    return job in store.jobs()


def find_checkpoint(store: Store, job: str, cid: str) -> CheckpointInfo:
    if not _CID_RE.fullmatch(cid):
        raise CliError(f"invalid checkpoint id {cid!r} (expected YYYYmmddTHHMMSS.mmmZ-xxxxxx)")
    for info in store.checkpoints(job):
        if info.checkpoint_id == cid:
            return info
    raise CliError(f"job {job} has no checkpoint {cid} in {store.url}", "CheckpointNotFound")


# ---------------------------------------------------------------------------------------------
# ls, inspect, rm, gc


@cli.command("ls")
@click.argument("job", required=False)
@pass_obj
def ls_cmd(obj: Obj, job: str | None) -> None:
    """List jobs and their checkpoints (newest first): id, state, size, stored, age, trigger."""
    store = obj.store
    if job is not None:
        job = job_arg(job)
        jobs = [job]
    else:
        jobs = store.jobs()
    with cf.ThreadPoolExecutor(8, thread_name_prefix="mmshimctl-ls") as pool:
        listings = list(pool.map(store.checkpoints, jobs))
    if job is not None and not listings[0] and not job_exists(store, job):
        raise CliError(f"no job {job} in {store.url}", "JobNotFound")
    now = time.time()
    data = [
        {"job_id": j, "checkpoints": [checkpoint_row(i, now) for i in infos]}
        for j, infos in zip(jobs, listings, strict=True)
    ]

    def human() -> None:
        if not data:
            click.echo(f"no jobs in {store.url}")
            return
        rows = []
        for entry in data:
            if not entry["checkpoints"]:
                rows.append([entry["job_id"], "(no checkpoints)", "", "", "", "", ""])
            rows += [[entry["job_id"], *checkpoint_cells(r)] for r in entry["checkpoints"]]
        table(["JOB", *CHECKPOINT_HEADERS], rows, right=frozenset({3, 4, 5}))

    obj.emit(data, human)


def event_line(ev: dict[str, Any]) -> str:
    skip = {"time", "event", "job_id"}
    fields = " ".join(f"{k}={v}" for k, v in ev.items() if k not in skip and v is not None)
    t = ev.get("time")
    when = utc(t) if isinstance(t, int | float) else "?"
    return f"{when}  {ev.get('event', '?')}  {fields}".rstrip()


def bad_reason(store: Store, job: str, cid: str) -> str | None:
    """Why a checkpoint is bad. Store has no reader for the marker; fetch raises with the reason
    before touching any chunk (it reads the marker first, or fails on the damaged manifest)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmshimctl-") as tmp:
        try:
            store.fetch(job, cid, tmp)
        except CheckpointUnusable as e:
            return str(e)
        except StoreError:
            return None
    return None


@cli.command("inspect")
@click.argument("target", metavar="JOB|JOB/CHECKPOINT")
@pass_obj
def inspect_cmd(obj: Obj, target: str) -> None:
    """Show a job's checkpoints and events, or one checkpoint's metadata (timings, CRIU stats,
    versions, layer and mounts)."""
    store = obj.store
    job, cid = split_target(target)
    now = time.time()
    if cid is not None:
        info = find_checkpoint(store, job, cid)
        data = {**checkpoint_row(info, now), "meta": info.meta}
        if info.state == "bad":
            data["reason"] = bad_reason(store, job, cid)
        obj.emit(data, lambda: show_checkpoint(data))
        return
    infos = store.checkpoints(job)
    events = store.events(job)
    if not infos and not events and not job_exists(store, job):
        raise CliError(f"no job {job} in {store.url}", "JobNotFound")
    data = {
        "job_id": job,
        "checkpoints": [{**checkpoint_row(i, now), "meta": i.meta} for i in infos],
        "events": events,
    }

    def human() -> None:
        click.echo(f"job {job}  ({store.url})")
        click.echo(f"checkpoints ({len(infos)}):")
        if infos:
            rows = [checkpoint_cells(checkpoint_row(i, now)) for i in infos]
            table(
                ["  " + CHECKPOINT_HEADERS[0], *CHECKPOINT_HEADERS[1:]],
                [["  " + r[0], *r[1:]] for r in rows],
                right=frozenset({2, 3, 4}),
            )
        click.echo(f"events ({len(events)}):")
        for ev in events:
            click.echo("  " + event_line(ev))

    obj.emit(data, human)


def show_checkpoint(data: dict[str, Any]) -> None:
    meta = dict(data["meta"])
    click.echo(f"checkpoint {data['job_id']}/{data['checkpoint_id']}")
    head = {
        "state": data["state"] + (f" ({data['reason']})" if data.get("reason") else ""),
        "created": f"{utc(data['created'])} ({human_age(data['age_s'])} ago)",
        "size": f"{human_bytes(data['size'])} raw, {human_bytes(data['stored'])} newly stored",
    }
    for key in ("trigger", "attempt", "host", "container_id", "progress_s"):
        if key in meta:
            value = meta.pop(key)
            head[key] = seconds(value) if key == "progress_s" else value
    if isinstance(meta.get("args"), list):
        head["args"] = " ".join(str(a) for a in meta.pop("args"))
    meta.pop("job_id", None)
    print_mapping(head)
    timings = meta.pop("timings", None)
    if isinstance(timings, dict) and timings:
        click.echo("timings:")
        print_mapping({k: seconds(v) for k, v in timings.items()})
    criu = {k: meta.pop(k) for k in CRIU_STATS if k in meta}
    if criu:
        click.echo("criu:")
        print_mapping({k: (seconds(v) if k.endswith("_s") else v) for k, v in criu.items()})
    for section in ("versions", "layer", "instance"):
        value = meta.pop(section, None)
        if section == "layer" and isinstance(value, dict) and isinstance(value.get("aligned"), dict):
            value["aligned"] = f"{len(value['aligned'])} files"  # their identities: --json has them
        if isinstance(value, dict) and value:
            click.echo(f"{section}:")
            print_mapping(value)
    if meta:
        click.echo("meta:")
        print_mapping(meta)


@cli.command("rm")
@click.argument("job")
@click.argument("checkpoint", required=False)
@pass_obj
def rm_cmd(obj: Obj, job: str, checkpoint: str | None) -> None:
    """Delete one checkpoint of a job, or the whole job (checkpoints, markers and events).

    Chunks are shared between checkpoints: `gc` reclaims those no checkpoint references.
    """
    store = obj.store
    job, cid = split_target(job)
    if cid is not None and checkpoint is not None:
        raise CliError("give the checkpoint either as JOB/CHECKPOINT or as a second argument, not both")
    cid = cid or checkpoint
    if cid is not None:
        find_checkpoint(store, job, cid)
        store.delete(job, cid)
        data: dict[str, Any] = {"deleted": {"job_id": job, "checkpoint_id": cid}}
        obj.emit(data, lambda: click.echo(f"deleted checkpoint {job}/{cid} (gc reclaims its chunks)"))
        return
    infos = store.checkpoints(job)
    if not infos and not job_exists(store, job):
        raise CliError(f"no job {job} in {store.url}", "JobNotFound")
    store.delete(job)
    data = {"deleted": {"job_id": job, "checkpoints": [i.checkpoint_id for i in infos]}}
    obj.emit(
        data,
        lambda: click.echo(
            f"deleted job {job}: {len(infos)} checkpoint(s) and its events (gc reclaims the chunks)"
        ),
    )


@cli.command("gc")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Keep unreferenced chunks younger than this (default: the store's grace_seconds, 6 h).",
)
@pass_obj
def gc_cmd(obj: Obj, grace: float | None) -> None:
    """Delete chunks and packs that no checkpoint references, stale in-flight markers and temp files.

    Deletes nothing while a checkpoint is being saved. The grace period must exceed the longest
    save: a shorter one can delete the chunks of a checkpoint still being written.
    """
    store = obj.store
    grace = store.grace_seconds if grace is None else grace
    if grace < GC_GRACE_WARN:
        click.echo(
            f"mmshimctl: warning: grace {grace:g}s is short; chunks of a checkpoint being saved right now "
            "may be deleted",
            err=True,
        )
    result = store.gc(grace)
    data = {"store": store.url, "grace_seconds": grace, **result}

    def human() -> None:
        if result["in_flight"]:
            click.echo(f"saves in flight ({', '.join(result['in_flight'])}): deleted nothing")
            return
        click.echo(
            f"chunks {result['chunks']}: {result['referenced']} referenced, {result['young']} younger than "
            f"{human_age(grace)}, {result['deleted']} deleted ({human_bytes(result['deleted_bytes'])})"
        )
        click.echo(
            f"packs {result['packs']}: {result['packs_deleted']} deleted, "
            f"{human_bytes(result['pack_bytes_trimmed'])} punched out of those kept"
        )
        click.echo(f"stale in-flight markers deleted: {result['stale_markers']}")
        click.echo(f"temp files deleted: {result['temp_files']}")

    obj.emit(data, human)


# ---------------------------------------------------------------------------------------------
# checkpoint and restore by hand


def runc_created(state: dict[str, Any]) -> float | None:
    """runc's `created` (RFC 3339 with nanoseconds) as epoch seconds."""
    text = str(state.get("created") or "")
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if not m:
        return None
    frac = (m.group(2) or "0")[:6]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.datetime.fromisoformat(f"{m.group(1)}.{frac.ljust(6, '0')}{tz}").timestamp()


def progress_of(root: str, container_id: str, state: dict[str, Any]) -> float | None:
    """Seconds of work the container holds: the runtime's record if it protects it, else its age."""
    from mmshim.lifecycle import STATE_FILE

    try:
        with open(os.path.join(root, container_id, STATE_FILE)) as f:
            saved = json.load(f)
        return float(saved["progress_base"]) + time.time() - float(saved["started"])
    except (OSError, ValueError, KeyError, TypeError):
        created = runc_created(state)
        return None if created is None else max(0.0, time.time() - created)


def load_bundle(path: str) -> Any:
    from mmshim.lifecycle import Bundle

    try:
        return Bundle.load(path)
    except ValueError as e:
        raise CliError(str(e)) from e


def job_of(bundle: Any, settings: cfg.Settings, job_id: str | None) -> cfg.Job:
    """The job a bundle's environment names (with its MMSHIM_* overrides), or job_id instead."""
    try:
        env_job = cfg.job_from_env(bundle.env, settings)
    except ValueError as e:
        raise CliError(str(e)) from e
    if job_id is None:
        if env_job is None:
            raise CliError(
                f"the container's environment ({bundle.path}/config.json) names no job "
                "(no AWS_BATCH_JOB_ID or MMSHIM_JOB_ID): pass --job"
            )
        job_arg(env_job.job_id)
        return env_job
    job_arg(job_id)
    if env_job is None:
        return cfg.Job(job_id=job_id, attempt=1, queue=None, compute_env=None, settings=settings)
    return cfg.Job(job_id, env_job.attempt, env_job.queue, env_job.compute_env, env_job.settings)


@contextlib.contextmanager
def host_checkpoint_lock(workdir: str) -> Iterator[None]:
    """The watcher's lock: one checkpoint at a time on a host."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "checkpoint.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            click.echo("mmshimctl: waiting for another checkpoint on this host to finish", err=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@cli.command("checkpoint")
@click.argument("container_id", metavar="CONTAINER")
@click.option(
    "--root",
    default=DEFAULT_ROOT,
    show_default=True,
    help="runc's state root (docker: /run/docker/runtime-runc/moby).",
)
@click.option(
    "--runc",
    "runc_path",
    metavar="PATH",
    help="The real runc (default: $MMSHIM_RUNC, the config's runc, PATH).",
)
@click.option(
    "--job",
    "job_id",
    help="Store it under this job (default: AWS_BATCH_JOB_ID/MMSHIM_JOB_ID of the container).",
)
@pass_obj
def checkpoint_cmd(obj: Obj, container_id: str, root: str, runc_path: str | None, job_id: str | None) -> None:
    """Checkpoint a running container now, leaving it running (trigger "manual")."""
    from mmshim import events

    runc = engine.Runc(obj.runc(runc_path), ["--root", root], root)
    state = runc.state(container_id)
    if state is None:
        raise CliError(f"no container {container_id!r} under runc root {root}", "ContainerNotFound")
    bundle = load_bundle(state["bundle"])
    job = job_of(bundle, obj.settings, job_id)
    store = obj.store
    meta: dict[str, Any] = {"job_id": job.job_id, "attempt": job.attempt, "trigger": "manual"}
    progress = progress_of(root, container_id, state)
    if progress is not None:
        meta["progress_s"] = progress
    rec = events.Recorder(job, container_id, store, source="mmshimctl")
    rec.emit("checkpoint.started", trigger="manual")
    try:
        with host_checkpoint_lock(job.settings.workdir):
            t0 = time.monotonic()
            with Meter("uploading", None, obj.interactive) as upload_progress:
                info = engine.checkpoint(
                    runc, container_id, store, job.job_id, meta, job.settings, upload_progress
                )
    except Exception as e:
        rec.emit("checkpoint.failed", logging.ERROR, trigger="manual", reason=f"{type(e).__name__}: {e}")
        raise
    duration = time.monotonic() - t0
    timings = dict(info.meta.get("timings") or {})
    rec.emit(
        "checkpoint.committed",
        trigger="manual",
        checkpoint_id=info.checkpoint_id,
        size=info.size,
        stored=info.stored,
        duration_s=duration,
        frozen_s=timings.get("paused_s"),
    )
    data = {
        "job_id": info.job_id,
        "checkpoint_id": info.checkpoint_id,
        "container_id": container_id,
        "size": info.size,
        "stored": info.stored,
        "duration_s": duration,
        "timings": timings,
        "criu": {k: info.meta[k] for k in CRIU_STATS if k in info.meta},
    }

    def human() -> None:
        click.echo(f"checkpoint {info.job_id}/{info.checkpoint_id} of container {container_id}")
        paused, layer_s = seconds(timings.get("paused_s")), seconds(timings.get("layer_s"))
        frozen = seconds(data["criu"].get("frozen_s"))
        print_mapping(
            {
                "size": f"{human_bytes(info.size)} raw, {human_bytes(info.stored)} newly stored",
                "paused": f"{paused} (layer capture {layer_s}, CRIU frozen {frozen})",
                "total": seconds(duration),
            }
        )

    obj.emit(data, human)


@cli.command("restore")
@click.argument("job_id", metavar="JOB")
@click.option(
    "--bundle",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="The new container's OCI bundle.",
)
@click.option("--id", "container_id", required=True, help="The new container's id.")
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="runc's state root.")
@click.option(
    "--pid-file", type=click.Path(dir_okay=False), help="Where runc writes the restored init's pid."
)
@click.option(
    "--checkpoint",
    "checkpoint_id",
    metavar="CHECKPOINT",
    help="This checkpoint instead of the newest good one.",
)
@click.option(
    "--runc",
    "runc_path",
    metavar="PATH",
    help="The real runc (default: $MMSHIM_RUNC, the config's runc, PATH).",
)
@pass_obj
def restore_cmd(
    obj: Obj,
    job_id: str,
    bundle: str,
    container_id: str,
    root: str,
    pid_file: str | None,
    checkpoint_id: str | None,
    runc_path: str | None,
) -> None:
    """Restore a job's checkpoint into a new container (bundle + id), running, detached.

    The bundle must run the same command; the checkpoint's writable layer is laid onto its rootfs.
    The restored process inherits this command's stdio where the checkpointed one had pipes.
    """
    from mmshim import events

    job_arg(job_id)
    if checkpoint_id is not None and not _CID_RE.fullmatch(checkpoint_id):
        raise CliError(f"invalid checkpoint id {checkpoint_id!r} (expected YYYYmmddTHHMMSS.mmmZ-xxxxxx)")
    b = load_bundle(os.path.abspath(bundle))
    job = job_of(b, obj.settings, job_id)
    runc = engine.Runc(obj.runc(runc_path), ["--root", root], root)
    if runc.state(container_id) is not None:
        raise CliError(f"container {container_id!r} already exists under runc root {root}")
    store = obj.store
    t0 = time.monotonic()
    with fetch_meter(store, job.job_id, checkpoint_id, obj.interactive) as progress:
        info = engine.restore(
            runc,
            container_id,
            b.path,
            os.path.abspath(pid_file) if pid_file else None,
            b.spec,
            store,
            job.job_id,
            job.settings,
            checkpoint_id,
            progress,
        )
    if info is None:
        raise CliError(f"job {job.job_id} has no good checkpoint in {store.url}", "NoCheckpoint")
    duration = time.monotonic() - t0
    events.Recorder(job, container_id, store, source="mmshimctl").emit(
        "restore.succeeded",
        checkpoint_id=info.checkpoint_id,
        duration_s=duration,
        progress_s=info.meta.get("progress_s", 0),
        streamed=bool(info.deferred),
    )
    data = {
        "job_id": job.job_id,
        "checkpoint_id": info.checkpoint_id,
        "container_id": container_id,
        "bundle": b.path,
        "size": info.size,
        "duration_s": duration,
    }
    obj.emit(
        data,
        lambda: click.echo(
            f"restored {job.job_id}/{info.checkpoint_id} into container {container_id} "
            f"({human_bytes(info.size)}, {seconds(duration)})"
        ),
    )


# ---------------------------------------------------------------------------------------------
# viewer and IMDS emulator


PRICES_OPTION = click.option(
    "--prices",
    "prices_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Price table (default $MMSHIM_VIEWER_PRICES, else the one shipped with mmshim).",
)


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--token",
    default=None,
    help="Access token required on every request (default $MMSHIM_VIEWER_TOKEN).",
)
@PRICES_OPTION
@pass_obj
def serve_cmd(obj: Obj, host: str, port: int, token: str | None, prices_path: str | None) -> None:
    """Serve the read-only web viewer of the store until interrupted."""
    try:
        viewer = importlib.import_module("mmshim.viewer")
    except ImportError as e:
        raise CliError(f"the viewer is not available: {e}") from e
    # The viewer takes a URL; S3 needs the config's store_options (endpoint, region...), so then
    # it gets the opened store, which its Viewer accepts as well.
    target: Any = obj.store if obj.settings.store_options else obj.store_url
    try:
        pricing.load_prices(prices_path)
    except ValueError as e:
        raise CliError(str(e)) from e
    viewer.serve(target, host, port, token, prices_path)


@cli.command("prices")
@PRICES_OPTION
@click.option(
    "--refresh",
    is_flag=True,
    help="Ask AWS for today's prices (needs pricing:GetProducts and ec2:DescribeSpotPriceHistory).",
)
@click.option("--region", default=None, help="Region to price (default: the table's).")
@click.option(
    "--type", "types", multiple=True, help="Instance type to refresh (default: every type in the table)."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where --refresh writes the table (default: --prices FILE; required with the shipped table).",
)
@click.option("--profile", default=None, help="AWS profile for --refresh.")
@click.option("--ec2-endpoint-url", default=None, hidden=True)  # tests: EC2 on moto
@pass_obj
def prices_cmd(
    obj: Obj,
    prices_path: str | None,
    refresh: bool,
    region: str | None,
    types: tuple[str, ...],
    out: str | None,
    profile: str | None,
    ec2_endpoint_url: str | None,
) -> None:
    """Show the viewer's price table; with --refresh, price it afresh from AWS and write it."""
    try:
        doc = pricing.load_prices(prices_path)
    except ValueError as e:
        raise CliError(str(e)) from e
    problems: list[str] = []
    if refresh:
        dest = out or prices_path or os.environ.get(pricing.PRICES_ENV)
        if not dest:
            raise CliError("--refresh needs --out FILE (the table shipped with mmshim is not overwritten)")
        region = region or doc.get("region") or "us-east-1"
        try:
            clients = pricing.clients(region, profile, ec2_endpoint_url)
            doc, problems = pricing.refresh(doc, region, list(types) or sorted(doc["instances"]), *clients)
        except Exception as e:  # botocore: no credentials, access denied, no network
            raise CliError(f"cannot refresh prices from AWS: {_describe(e)}", "aws_error") from e
        tmp = f"{dest}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, dest)
        doc["path"] = dest
        for p in problems:
            click.echo(f"warning: {p}", err=True)

    def human() -> None:
        click.echo(f"{doc.get('path')}: {doc.get('region')} prices of {doc.get('date')}")
        rows = [
            [t, str(p.get("vcpus", "?")), f"{p['on_demand']:.4f}", f"{p['spot']:.4f}"]
            for t, p in sorted(doc["instances"].items())
        ]
        table(["type", "vCPUs", "on-demand $/h", "Spot $/h"], rows, right=frozenset({1, 2, 3}))

    obj.emit({**doc, "problems": problems}, human)


@cli.command(
    "imds-emulator",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def imds_emulator_cmd(ctx: click.Context, args: tuple[str, ...]) -> None:
    """The IMDS emulator: serve, spot, rebalance, reset, state, fault (`imds-emulator --help`)."""
    from mmshim import imds_emulator

    ctx.exit(imds_emulator.main(list(args)) or 0)


def main() -> None:
    cli(prog_name="mmshimctl")


if __name__ == "__main__":
    main()

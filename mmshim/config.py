"""Host settings (/etc/mmshim/config.toml) and the per-job overrides a job sets in its environment.

Only protected containers get here: the passthrough path never imports this module.
"""

import os
import tomllib
from dataclasses import dataclass, field, fields, replace

from mmshim.lifecycle import job_identity, protection_off

CONFIG_FILE = "/etc/mmshim/config.toml"
TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    store: str = "file:///var/lib/mmshim/store"
    store_options: dict = field(default_factory=dict)  # endpoint_url, region, sse, kms_key_id, storage_class
    workdir: str = "/var/lib/mmshim/work"
    log_dir: str = "/var/log/mmshim"
    protect: bool = True
    interval: float = 900.0  # seconds between interval checkpoints; the first one interval after start
    diagnosis: bool = False  # keep every checkpoint and its logs, even after success
    restore_stream: bool = True  # page images go into CRIU while they download (a patched CRIU)
    tcp: str = "close"  # established connections come back closed (their peer is gone on a new host)
    mounts: tuple[str, ...] = ("/dev/shm",)  # container paths whose contents travel with a checkpoint
    mount_cap: int = 1 << 30  # bytes per mount; larger refuses the checkpoint instead of dropping data
    layer_cap: int = 50 << 30  # bytes of writable layer
    keep: int = 2
    imds_endpoint: str | None = None
    imds_poll: float = 5.0
    on_rebalance: bool = True
    docker_host: str = "unix:///var/run/docker.sock"  # asked for the exit code when the job ends


@dataclass(frozen=True)
class Job:
    """Who a container is, from its environment; None for anything that is not a Batch job."""

    job_id: str
    attempt: int
    queue: str | None
    compute_env: str | None
    settings: Settings


def load_settings(path: str | None = None) -> Settings:
    path = path or os.environ.get("MMSHIM_CONFIG", CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return Settings()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    known = {f.name for f in fields(Settings)}
    unknown = set(data) - known - {"runc"}
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    values = {k: v for k, v in data.items() if k in known}
    if "mounts" in values:
        values["mounts"] = tuple(values["mounts"])
    return Settings(**values)


def job_from_env(env: dict[str, str], settings: Settings) -> Job | None:
    """The job and its settings: the host's, overridden by MMSHIM_* in the job's environment."""
    identity = job_identity(env)
    if identity is None:
        return None
    overrides: dict = {}
    if "MMSHIM_PROTECT" in env:
        overrides["protect"] = not protection_off(env)
    try:
        if "MMSHIM_INTERVAL" in env:
            overrides["interval"] = max(1.0, float(env["MMSHIM_INTERVAL"]))
    except ValueError as exc:
        raise ValueError(f"bad mmshim setting in the job's environment: {exc}") from exc
    if "MMSHIM_DIAGNOSIS" in env:
        overrides["diagnosis"] = env["MMSHIM_DIAGNOSIS"].lower() in TRUE
    if "MMSHIM_RESTORE_STREAM" in env:
        overrides["restore_stream"] = env["MMSHIM_RESTORE_STREAM"].lower() in TRUE
    if env.get("MMSHIM_TCP") in ("close", "established"):
        overrides["tcp"] = env["MMSHIM_TCP"]
    return Job(
        job_id=identity[0],
        attempt=identity[1],
        queue=env.get("AWS_BATCH_JQ_NAME"),
        compute_env=env.get("AWS_BATCH_CE_NAME"),
        settings=replace(settings, **overrides),
    )

"""Job events: one JSON log line each (python-json-logger) and the same record kept in the store.

The store copy is what the viewer reads after the job's hosts are gone. A store that cannot take
an event never stops the job: the failure is logged and the work goes on.
"""

import logging
import os
import socket
import time

from pythonjsonlogger.json import JsonFormatter

from mmshim.config import Job
from mmshim.store import Store

log = logging.getLogger("mmshim")


def setup_logging(job: Job, container_id: str, component: str) -> None:
    """JSON lines to <log_dir>/mmshim.log, with job id, container id and attempt in every record.

    Never to stdout/stderr: those are the container's own output streams.
    """
    os.makedirs(job.settings.log_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(job.settings.log_dir, "mmshim.log"))
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    context = {
        "job_id": job.job_id,
        "attempt": job.attempt,
        "container_id": container_id,
        "component": component,
        "pid": os.getpid(),
    }

    def add_context(record: logging.LogRecord) -> bool:
        for key, value in context.items():
            setattr(record, key, value)
        return True

    handler.addFilter(add_context)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("s3transfer").setLevel(logging.WARNING)


class Recorder:
    def __init__(self, job: Job, container_id: str, store: Store | None, **extra: object) -> None:
        self.store = store
        self.base = {
            "job_id": job.job_id,
            "attempt": job.attempt,
            "container_id": container_id,
            "host": socket.gethostname(),
            "queue": job.queue,
            "compute_env": job.compute_env,
            **extra,
        }

    def emit(self, name: str, level: int = logging.INFO, **fields: object) -> None:
        event = {"time": time.time(), "event": name, **self.base, **fields}
        log.log(level, name, extra={"event": name, **fields})
        if self.store is None:
            return
        try:
            self.store.put_event(str(self.base["job_id"]), event)
        except Exception as exc:
            log.warning("event %s not stored: %s", name, exc)

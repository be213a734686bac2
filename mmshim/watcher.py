"""The watcher: one detached process per protected container, gone when the container is gone.

Started by mmshim.lifecycle (which detaches it and lets go of the container's fds first).

It takes interval checkpoints (the first one interval after start, so short jobs never pay for
one), a final checkpoint at once on a Spot interruption notice (and on a rebalance
recommendation), and on exit deletes the job's checkpoints if the job succeeded. Nothing it
meets (IMDS down, store down, CRIU failing) may kill or block the job: it logs and carries on.

Host policy when several containers get the same notice: checkpoints on one host are taken one
at a time (an exclusive lock in the work dir), so each gets the whole bandwidth and finishes
inside the 2-minute window instead of all of them sharing it and none finishing.
"""

import argparse
import fcntl
import http.client
import json
import logging
import os
import socket
import sys
import time

from mmshim import config, engine, events, imds
from mmshim.lifecycle import STATE_FILE, WATCHER_NICE, Bundle
from mmshim.store import open_store

log = logging.getLogger("mmshim.watcher")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


def exit_code(docker_host: str, container_id: str) -> int | None:
    """The job's exit code from dockerd (runc does not keep it); None when it cannot be known."""
    if not docker_host.startswith("unix://"):
        return None
    try:
        conn = UnixHTTPConnection(docker_host.removeprefix("unix://"))
        conn.request("GET", f"/containers/{container_id}/json")
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        return int(json.loads(resp.read())["State"]["ExitCode"])
    except (OSError, ValueError, KeyError, http.client.HTTPException):
        return None


class NotProtected(Exception):
    """Protection is off in the host's config: the runtime does not read it, to stay cheap."""


class Watcher:
    def __init__(
        self, args: argparse.Namespace, bundle: Bundle | None = None, state: dict | None = None
    ) -> None:
        self.cid = args.container_id
        bundle = bundle or Bundle.load(args.bundle)
        job = config.job_from_env(bundle.env, config.load_settings())
        if job is None or not job.settings.protect:
            raise NotProtected
        self.job = job
        self.settings = job.settings
        events.setup_logging(self.job, self.cid, "watcher")
        if args.skip:
            log.warning("not protected: %s", args.skip)
            store = open_store(self.settings.store, **self.settings.store_options)
            events.Recorder(job, self.cid, store).emit("protection.skipped", reason=args.skip)
            raise NotProtected
        self.runc = engine.Runc(args.runc, json.loads(args.global_argv), args.root)
        if state is None:
            with open(os.path.join(args.root, self.cid, STATE_FILE)) as f:
                state = json.load(f)
        self.state = state
        self.store = open_store(self.settings.store, **self.settings.store_options)
        self.imds = imds.ImdsClient(self.settings.imds_endpoint)
        info = self.imds.instance_info()
        self.rec = events.Recorder(
            self.job,
            self.cid,
            self.store,
            instance_id=info.get("instance-id"),
            instance_type=info.get("instance-type"),
            lifecycle=info.get("instance-life-cycle"),
        )
        self.instance = info
        if not self.state.get("restored"):
            self.rec.emit("start")

    def checkpoint(self, trigger: str) -> None:
        self.rec.emit("checkpoint.started", trigger=trigger)
        t0 = time.monotonic()
        meta = {
            "job_id": self.job.job_id,
            "attempt": self.job.attempt,
            "trigger": trigger,
            "instance": self.instance,
            "progress_s": self.state["progress_base"] + time.time() - self.state["started"],
        }
        os.makedirs(self.settings.workdir, exist_ok=True)
        try:
            with open(os.path.join(self.settings.workdir, "checkpoint.lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one checkpoint at a time on this host
                os.setpriority(os.PRIO_PROCESS, 0, 0)  # the freeze must be short: full priority
                try:
                    info = engine.checkpoint(
                        self.runc,
                        self.cid,
                        self.store,
                        self.job.job_id,
                        meta,
                        self.settings,
                        urgent=trigger == "spot",
                    )
                finally:
                    os.setpriority(os.PRIO_PROCESS, 0, WATCHER_NICE)
            if not self.settings.diagnosis:
                self.store.retain(self.job.job_id, self.settings.keep)
        except Exception as exc:
            log.exception("checkpoint failed")
            self.rec.emit(
                "checkpoint.failed", logging.ERROR, trigger=trigger, reason=f"{type(exc).__name__}: {exc}"
            )
            return
        self.rec.emit(
            "checkpoint.committed",
            trigger=trigger,
            checkpoint_id=info.checkpoint_id,
            size=info.size,
            stored=info.stored,
            duration_s=time.monotonic() - t0,
            frozen_s=info.meta.get("timings", {}).get("paused_s"),
        )

    def notices(self, seen: set[str], backoff: imds.Backoff) -> list[imds.Notice]:
        found = []
        try:
            for notice in (
                self.imds.spot_notice(),
                self.imds.rebalance() if self.settings.on_rebalance else None,
            ):
                if notice is not None and notice.kind not in seen:
                    seen.add(notice.kind)
                    found.append(notice)
            backoff.reset()
        except imds.ImdsUnavailable as exc:
            delay = backoff.next_delay()
            log.warning("IMDS unavailable (%s); next try in %.1fs", exc, delay)
            time.sleep(delay)
        return found

    def run(self) -> None:
        next_at = time.monotonic() + self.settings.interval
        seen: set[str] = set()
        backoff = imds.Backoff(base=1.0, cap=30.0)
        while True:
            status = (self.runc.state(self.cid) or {}).get("status")
            if status in (None, "stopped"):
                break
            for notice in self.notices(seen, backoff):
                if notice.kind == "spot":
                    self.rec.emit("spot.notice", action=notice.action, notice_time=notice.time)
                else:
                    self.rec.emit("rebalance", notice_time=notice.time)
                self.checkpoint(notice.kind)
                next_at = time.monotonic() + self.settings.interval
            if time.monotonic() >= next_at and status == "running":
                self.checkpoint("interval")
                next_at = time.monotonic() + self.settings.interval
            time.sleep(max(0.1, min(self.settings.imds_poll, next_at - time.monotonic())))
        self.finish()

    def finish(self) -> None:
        code = None
        for _ in range(20):  # dockerd records the exit code just after the process is reaped
            code = exit_code(self.settings.docker_host, self.cid)
            if code is not None:
                break
            time.sleep(0.25)
        self.rec.emit("exit", exit_code=code)
        if code == 0 and not self.settings.diagnosis:
            for info in self.store.checkpoints(self.job.job_id):  # events stay: they are the job's history
                self.store.delete(self.job.job_id, info.checkpoint_id)
            log.info("job succeeded: its checkpoints are deleted (gc reclaims their chunks)")


def main(bundle: Bundle | None = None, state: dict | None = None) -> None:
    """``bundle`` and ``state``: what lifecycle.watcher_main read before they could go."""
    parser = argparse.ArgumentParser()
    for flag in ("--runc", "--root", "--bundle", "--global-argv"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--skip", help="only record why the container is not protected")
    parser.add_argument("container_id")
    args = parser.parse_args()
    try:
        Watcher(args, bundle, state).run()
    except NotProtected:
        return
    except Exception:
        logging.getLogger("mmshim.watcher").exception("watcher stopped")
        sys.exit(1)


if __name__ == "__main__":
    main()

"""A read-only web viewer of a checkpoint store: what happened to each job and what mmshim saved.

It reads nothing but the store (file:// or s3://), through mmshim.store's public API, so it keeps
working after the hosts are gone. ``make_app`` builds the Flask app, ``serve`` runs it on a
threaded stdlib-based (werkzeug) server bound to 127.0.0.1 by default. The JSON API lives under
/api/v1 and is described in docs/viewer-api.md; the page (viewer_static/) is plain HTML/JS with a
vendored Apache ECharts, so it works offline.

How it stays fast with many jobs: the store keeps one digest per job (mmshim.digest: events and
checkpoints boiled down as they are written), so a first load reads one small object per job, not
its whole history. Each digest is turned into a view (summary row, attempts, per-day counters,
priced) and cached per job; the job listing (``Store.jobs()``) is cached for a short TTL. On a
listing refresh only jobs that are new, or still active (running, restoring, interrupted...) and
older than the TTL, are read again, plus a bounded number of settled jobs whose view is older than
``max_age``; jobs gone from the listing are dropped. Overview and per-day series are aggregated
from the views and cached until a view changes. A job's page always reads that job's events and
checkpoints themselves.

Statuses derived from events (the last attempt decides): running, restoring, succeeded (exit 0),
failed (non-zero exit without a Spot notice), interrupted (reclaimed or lost: waiting for Batch to
retry), stale (no exit and no event for ``stale_after`` seconds), unknown (no events).
"""

from __future__ import annotations

import argparse
import calendar
import concurrent.futures as cf
import contextlib
import gc
import hmac
import io
import json
import logging
import math
import os
import random
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard
from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException, NotFound

from mmshim import digest
from mmshim.digest import DAY_FIELDS, MAX_FIELDS, day_name
from mmshim.pricing import load_prices
from mmshim.store import (
    FORMAT,
    CheckpointInfo,
    InvalidJobId,
    Store,
    StoreError,
    chunk_hash,
    encode_manifest,
    open_store,
    validate_job_id,
)

__all__ = ["Viewer", "make_app", "serve", "summarize", "write_sample_store"]

log = logging.getLogger("mmshim.viewer")

API = "/api/v1"
STATIC_DIR = Path(__file__).with_name("viewer_static")
TOKEN_ENV = "MMSHIM_VIEWER_TOKEN"
TOKEN_COOKIE = "mmshim_viewer_token"
DEFAULT_TTL = 10.0  # seconds a store listing is trusted
DEFAULT_MAX_AGE = 300.0  # seconds before a settled job's view is read again
DEFAULT_REFRESH_BUDGET = 500  # settled jobs re-read per listing refresh, at most
DEFAULT_STALE_AFTER = 6 * 3600.0  # no event for this long and no exit: "stale"
DEFAULT_BUNDLE_FETCH_LIMIT = 256 * 1024 * 1024  # larger checkpoints are not fetched for their logs
ZERO_DAY = dict.fromkeys(DAY_FIELDS, 0.0)
SETTLED = frozenset({"succeeded", "failed"})
STATUSES = ("running", "restoring", "interrupted", "stale", "succeeded", "failed", "unknown")
SORT_KEYS = {
    "job_id": lambda s: s["job_id"],
    "status": lambda s: s["status"],
    "queue": lambda s: s["queue"] or "",
    "attempts": lambda s: s["attempts"],
    "checkpoints": lambda s: s["checkpoints"],
    "bytes_stored": lambda s: s["bytes_stored"],
    "first_event": lambda s: s["first_event"] or 0.0,
    "last_event": lambda s: (s["last_event"] or {}).get("time") or 0.0,
    "restores": lambda s: s["restores_succeeded"],
    "cost": lambda s: s["cost_usd"] or 0.0,
    "kept_hours": lambda s: s["kept_vcpu_hours"],
}


# ---------------------------------------------------------------------------------------------
# Digest of one job


def summarize(
    job_id: str,
    events: list[dict[str, Any]],
    checkpoints: list[CheckpointInfo],
    prices: dict[str, Any],
    now: float | None = None,
    stale_after: float = DEFAULT_STALE_AFTER,
) -> dict[str, Any]:
    """A job's view (mmshim.digest.view) from its events and checkpoints themselves."""
    now = time.time() if now is None else now
    return digest.view(job_id, digest.build(events, checkpoints), prices, now, stale_after)


def _checkpoint_row(c: CheckpointInfo, committed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ev = committed.get(c.checkpoint_id, {})
    return {
        "checkpoint_id": c.checkpoint_id,
        "created": c.created,
        "size": c.size,
        "stored": c.stored,
        "state": c.state,
        "meta": c.meta,
        "trigger": ev.get("trigger", c.meta.get("trigger")),
        "duration_s": ev.get("duration_s"),
        "frozen_s": ev.get("frozen_s"),
        "attempt": ev.get("attempt"),
        "host": ev.get("host"),
    }


# ---------------------------------------------------------------------------------------------
# The cache and the queries


@dataclass
class _Entry:
    view: dict[str, Any]
    loaded_at: float


class Viewer:
    """Store reads, the per-job view cache and the aggregations; the web layer is make_app."""

    def __init__(
        self,
        store: Store | str,
        prices_path: str | os.PathLike[str] | None = None,
        *,
        ttl: float = DEFAULT_TTL,
        max_age: float = DEFAULT_MAX_AGE,
        refresh_budget: int = DEFAULT_REFRESH_BUDGET,
        stale_after: float = DEFAULT_STALE_AFTER,
        bundle_fetch_limit: int = DEFAULT_BUNDLE_FETCH_LIMIT,
        workers: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = open_store(store) if isinstance(store, str) else store
        self.prices = load_prices(prices_path)
        self.ttl, self.max_age, self.refresh_budget = ttl, max_age, refresh_budget
        self.stale_after, self.bundle_fetch_limit = stale_after, bundle_fetch_limit
        # Threads only help where reads wait on the network; a file store is CPU-bound (GIL).
        self.workers = workers if workers is not None else (8 if self.store.url.startswith("s3://") else 1)
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._listing: list[str] = []
        self._listed_at = -math.inf
        self._generation = 0
        self._aggregates: dict[str, tuple[int, Any]] = {}
        self._lock = threading.Lock()  # guards _entries/_listing/_aggregates
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._loading: dict[str, int] | None = None

    # -- reading the store ---------------------------------------------------------------------

    def _read(self, job: str) -> tuple[list[dict[str, Any]], list[CheckpointInfo]]:
        return self.store.events(job), self.store.checkpoints(job)

    def _view(self, job: str, doc: dict[str, Any]) -> dict[str, Any]:
        return digest.view(job, doc, self.prices, self.clock(), self.stale_after)

    def _load(self, job: str) -> dict[str, Any]:
        """The job's view from its digest; from its events and checkpoints if it has none."""
        doc = self.store.digest(job)
        return self._view(job, doc if doc is not None else digest.build(*self._read(job)))

    def refresh(self, force: bool = False) -> None:
        """Bring the cache up to date if the listing is older than the TTL (or force).

        If another thread is refreshing already, return at once: callers serve what is cached
        (during the first load that is partial, see ``loading``).
        """
        if not force and self.clock() - self._listed_at < self.ttl:
            return
        if not self._refresh_lock.acquire(blocking=False):
            return  # another thread refreshes: serve what is cached (partial during the first load)
        try:
            if force or self.clock() - self._listed_at >= self.ttl:
                if self._listed_at == -math.inf:
                    self._loading = {"done": 0, "total": 0}
                self._refresh()
        finally:
            self._refresh_lock.release()

    def warm_up(self) -> threading.Thread:
        """Load the cache in a background thread (serve() does this: pages answer meanwhile)."""
        t = threading.Thread(target=self.refresh, name="mmshim-viewer-warmup", daemon=True)
        t.start()
        return t

    @property
    def loading(self) -> dict[str, int] | None:
        """{"done", "total"} while the first load of the store runs, else None."""
        return self._loading

    def _refresh(self) -> None:
        now = self.clock()
        ids = self.store.jobs()
        present = set(ids)
        with self._lock:
            gone = [j for j in self._entries if j not in present]
            todo = [j for j in ids if j not in self._entries]
            settled: list[tuple[float, str]] = []
            for j, e in self._entries.items():
                if j not in present:
                    continue
                age = now - e.loaded_at
                if e.view["summary"]["status"] not in SETTLED:
                    if age >= self.ttl:
                        todo.append(j)
                elif age >= self.max_age:
                    settled.append((e.loaded_at, j))
            for j in gone:
                del self._entries[j]
            if gone:
                self._generation += 1
        settled.sort()
        todo += [j for _, j in settled[: self.refresh_budget]]
        first = self._listed_at == -math.inf
        if first:
            self._loading = {"done": 0, "total": len(todo)}
        pool = (
            cf.ThreadPoolExecutor(self.workers, thread_name_prefix="mmshim-viewer")
            if len(todo) > 1 and self.workers > 1
            else None
        )
        gc.disable()  # a first load makes ~50 objects per job and keeps them: collecting them is waste
        try:
            for i in range(0, len(todo), 250):  # publish in batches: a first load shows progress
                batch = todo[i : i + 250]
                views = pool.map(self._safe_load, batch) if pool else map(self._safe_load, batch)
                loaded = {j: v for j, v in zip(batch, views, strict=True) if v is not None}
                with self._lock:
                    changed = False
                    for j, d in loaded.items():
                        old = self._entries.get(j)
                        changed = changed or old is None or old.view != d
                        self._entries[j] = _Entry(d, now)
                    if changed:
                        self._generation += 1
                if first:
                    self._loading = {"done": min(len(todo), i + 250), "total": len(todo)}
        finally:
            if first:
                gc.freeze()  # and later collections need not walk them (views hold no cycles)
            gc.enable()
            if pool:
                pool.shutdown()
            self._loading = None
        with self._lock:
            self._listing = ids
            self._listed_at = self.clock()  # the TTL runs from the end of a (long) refresh

    def _safe_load(self, job: str) -> dict[str, Any] | None:
        try:
            return self._load(job)
        except StoreError as e:
            log.warning("cannot read job %s: %s", job, e)
            return None

    def _views(self) -> tuple[int, list[dict[str, Any]]]:
        self.refresh()
        with self._lock:
            return self._generation, [e.view for e in self._entries.values()]

    def _cached(self, name: str, build: Callable[[list[dict[str, Any]]], Any]) -> Any:
        gen, views = self._views()
        with self._lock:
            hit = self._aggregates.get(name)
        if hit is not None and hit[0] == gen:
            return hit[1]
        value = build(views)
        with self._lock:
            self._aggregates[name] = (gen, value)
        return value

    # -- API -----------------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        out = dict(self._cached("overview", self._overview))
        out["as_of"] = self._listed_at if self._listed_at > 0 else None
        out["cache_age_s"] = max(0.0, self.clock() - self._listed_at) if self._listed_at > 0 else None
        out["loading"] = self.loading
        return out

    def _price_info(self) -> dict[str, Any]:
        p = self.prices
        return {k: p.get(k) for k in ("date", "region", "currency", "note", "path")}

    def _overview(self, views: list[dict[str, Any]]) -> dict[str, Any]:
        sums = dict.fromkeys(DAY_FIELDS, 0.0)
        statuses = dict.fromkeys(STATUSES, 0)
        hours = {"spot": 0.0, "on-demand": 0.0, "unknown": 0.0}
        unpriced: dict[str, float] = {}
        costs = {"on_demand_usd": 0.0, "kept_on_demand_usd": 0.0, "spot_usd": 0.0, "other_usd": 0.0}
        protected = restored = cps_now = bytes_stored = bytes_raw = rebalance = 0
        for dg in views:
            s = dg["summary"]
            statuses[s["status"]] = statuses.get(s["status"], 0) + 1
            protected += s["protected"]
            restored += s["restored"]
            cps_now += s["checkpoints"]
            bytes_stored += s["bytes_stored"]
            bytes_raw += s["bytes_raw"]
            rebalance += s["rebalance_notices"]
            for k, v in dg["totals"].items():
                sums[k] += v
            for k, v in dg["lifecycle_hours"].items():
                hours[k] += v
            for k, v in dg["unpriced"].items():
                unpriced[k] = unpriced.get(k, 0.0) + v
            for k, v in dg["costs"].items():
                costs[k] += v
        attempted, succeeded = int(sums["restores_attempted"]), int(sums["restores_succeeded"])
        return {
            "jobs": len(views),
            "jobs_protected": protected,
            "jobs_restored": restored,
            "statuses": statuses,
            "restores": {
                "attempted": attempted,
                "succeeded": succeeded,
                "fallbacks": int(sums["fallbacks"]),
                "success_rate": succeeded / attempted if attempted else None,
            },
            "checkpoints": {
                "taken": int(sums["checkpoints"]),
                "failed": int(sums["ckpt_failed"]),
                "in_store": cps_now,
                "bytes_stored": bytes_stored,
                "bytes_raw": bytes_raw,
            },
            "spot_notices": int(sums["spot_notices"]),
            "rebalance_notices": rebalance,
            "compute_hours_kept": sums["kept_vcpu_hours"],
            "cost": {
                "currency": self.prices.get("currency", "USD"),
                "instance_hours": hours,
                "actual_usd": sums["cost_usd"],
                "spot_usd": costs["spot_usd"],
                "on_demand_usd": costs["other_usd"],
                "on_demand_equivalent_usd": costs["on_demand_usd"],
                "savings_usd": costs["on_demand_usd"] - sums["cost_usd"],
                "kept_usd": sums["kept_usd"],
                "kept_on_demand_usd": costs["kept_on_demand_usd"],
                "unpriced_hours": dict(sorted(unpriced.items())),
            },
            "prices": self._price_info(),
        }

    def jobs(self, params: dict[str, str]) -> dict[str, Any]:
        """One page of job summaries; see docs/viewer-api.md for the parameters."""
        page = _int_param(params, "page", 1, 1, 10**9)
        per_page = _int_param(params, "per_page", 50, 1, 500)
        sort = params.get("sort") or "last_event"
        if sort not in SORT_KEYS:
            raise BadRequest(f"sort must be one of {', '.join(SORT_KEYS)}")
        order = params.get("order") or ("asc" if sort in ("job_id", "queue", "status") else "desc")
        if order not in ("asc", "desc"):
            raise BadRequest("order must be asc or desc")
        status = {s for s in (params.get("status") or "").split(",") if s}
        if status - set(STATUSES):
            raise BadRequest(f"status must be among {', '.join(STATUSES)}")
        queue = params.get("queue") or None
        restored = params.get("restored") or None
        if restored not in (None, "true", "false"):
            raise BadRequest("restored must be true or false")
        since = _date_param(params, "from")
        until = _date_param(params, "to")
        q = (params.get("q") or "").lower()
        _, views = self._views()
        rows = [v["summary"] for v in views]
        facets = {
            "queues": sorted({r["queue"] for r in rows if r["queue"]}),
            "statuses": {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES},
        }
        if status:
            rows = [r for r in rows if r["status"] in status]
        if queue:
            rows = [r for r in rows if r["queue"] == queue]
        if restored:
            rows = [r for r in rows if r["restored"] == (restored == "true")]
        if since is not None:
            rows = [r for r in rows if r["last_event"] and r["last_event"]["time"] >= since]
        if until is not None:
            rows = [r for r in rows if r["first_event"] is not None and r["first_event"] < until + 86400]
        if q:
            rows = [r for r in rows if q in r["job_id"].lower()]
        key = SORT_KEYS[sort]
        rows.sort(key=lambda r: r["job_id"])
        rows.sort(key=key, reverse=order == "desc")
        total = len(rows)
        start = (page - 1) * per_page
        return {
            "total": total,
            "page": page,
            "per_page": per_page,
            "pages": max(1, math.ceil(total / per_page)),
            "sort": sort,
            "order": order,
            "jobs": rows[start : start + per_page],
            "facets": facets,
            "loading": self.loading,
        }

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's summary, attempts, checkpoints and events, read afresh; NotFound if none."""
        job = _job_or_404(job_id)
        events, cps = self._read(job)
        if not events and not cps:
            raise NotFound(f"job {job!r} is not in the store")
        view = self._view(job, digest.build(events, cps))
        with self._lock:
            old = self._entries.get(job)
            if old is not None and old.view != view:
                self._entries[job] = _Entry(view, self.clock())
                self._generation += 1
        committed = {
            e["checkpoint_id"]: e
            for e in events
            if e.get("event") == "checkpoint.committed" and isinstance(e.get("checkpoint_id"), str)
        }
        return {
            "job": view["summary"],
            "attempts": view["attempts"],
            "checkpoints": [_checkpoint_row(c, committed) for c in cps],
            "events": events,
            "days": [{"date": k, **ZERO_DAY, **v} for k, v in sorted(view["days"].items())],
            "now": self.clock(),
        }

    def exists(self, job_id: str) -> bool:
        try:
            job = validate_job_id(job_id)
        except InvalidJobId:
            return False
        self.refresh()
        with self._lock:
            if job in self._entries:
                return True
        events, cps = self._read(job)
        return bool(events or cps)

    def daily(self, params: dict[str, str]) -> dict[str, Any]:
        """Per-UTC-day series over all jobs (days without activity filled with zeros)."""
        since, until = _date_param(params, "from"), _date_param(params, "to")
        days = self._cached("daily", self._daily)
        rows = [
            r
            for r in days
            if (since is None or _parse_day(r["date"]) >= since)
            and (until is None or _parse_day(r["date"]) <= until)
        ]
        return {"days": rows, "currency": self.prices.get("currency", "USD"), "loading": self.loading}

    def _daily(self, views: list[dict[str, Any]]) -> list[dict[str, Any]]:
        merged: dict[str, dict[str, float]] = {}
        for dg in views:
            for name, d in dg["days"].items():
                m = merged.get(name)
                if m is None:
                    merged[name] = dict(d)
                    continue
                for k, v in d.items():
                    m[k] = max(m.get(k, 0.0), v) if k in MAX_FIELDS else m.get(k, 0.0) + v
        if not merged:
            return []
        first, last = _parse_day(min(merged)), _parse_day(max(merged))
        first = max(first, last - 730 * 86400)  # two years at most
        out = []
        t = first
        while t <= last:
            name = day_name(t)
            d = ZERO_DAY | merged.get(name, {})
            n, timed = d["checkpoints"], d["ckpt_timed"]
            out.append(
                {
                    "date": name,
                    "checkpoints": int(n),
                    "checkpoints_failed": int(d["ckpt_failed"]),
                    "ckpt_size_mean": d["ckpt_size"] / n if n else None,
                    "ckpt_size_max": d["ckpt_size_max"] if n else None,
                    "ckpt_stored": d["ckpt_stored"],
                    "ckpt_duration_mean": d["ckpt_duration"] / timed if timed else None,
                    "ckpt_duration_max": d["ckpt_duration_max"] if timed else None,
                    "ckpt_frozen_mean": d["ckpt_frozen"] / timed if timed else None,
                    "restores_attempted": int(d["restores_attempted"]),
                    "restores_succeeded": int(d["restores_succeeded"]),
                    "fallbacks": int(d["fallbacks"]),
                    "spot_notices": int(d["spot_notices"]),
                    "instance_hours": d["instance_hours"],
                    "cost_usd": d["cost_usd"],
                    "on_demand_usd": d["on_demand_usd"],
                    "savings_usd": d["on_demand_usd"] - d["cost_usd"],
                    "kept_usd": d["kept_usd"],
                    "kept_vcpu_hours": d["kept_vcpu_hours"],
                }
            )
            t += 86400
        return out

    def bundle(self, job_id: str, out: io.IOBase | Any) -> None:
        """Write the job's log bundle (tar.gz) to `out`: events, summary, each checkpoint's info and
        its ``logs/*`` files (fetched through Store.fetch, for good checkpoints up to
        bundle_fetch_limit raw bytes; the rest say why in their checkpoint.json)."""
        detail = self.job(job_id)
        job = detail["job"]["job_id"]
        root = job.replace(":", "_")
        now = self.clock()
        with tarfile.open(fileobj=out, mode="w:gz", compresslevel=6) as tar:

            def add(name: str, data: bytes) -> None:
                ti = tarfile.TarInfo(f"{root}/{name}")
                ti.size, ti.mtime, ti.mode = len(data), int(now), 0o644
                tar.addfile(ti, io.BytesIO(data))

            add("events.json", _dump(detail["events"]))
            add("job.json", _dump({k: detail[k] for k in ("job", "attempts", "checkpoints")}))
            for cp in detail["checkpoints"]:
                cid = cp["checkpoint_id"]
                info = dict(cp)
                logs, note = self._checkpoint_logs(job, cp)
                info["logs"] = sorted(logs)
                if note:
                    info["logs_note"] = note
                add(f"checkpoints/{cid}/checkpoint.json", _dump(info))
                for name, data in sorted(logs.items()):
                    add(f"checkpoints/{cid}/{name}", data)
            add(
                "README.txt",
                (
                    f"mmshim log bundle of job {job}, made "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))} from {self.store.url}.\n"
                    "events.json: the job's events in time order.\n"
                    "job.json: summary, attempts, checkpoints.\n"
                    "checkpoints/<id>/checkpoint.json: the checkpoint's manifest info.\n"
                    "checkpoints/<id>/logs/*: its CRIU logs.\n"
                ).encode(),
            )

    def _checkpoint_logs(self, job: str, cp: dict[str, Any]) -> tuple[dict[str, bytes], str | None]:
        if cp["state"] != "good":
            return {}, "checkpoint is marked bad or damaged: logs not fetched"
        if cp["size"] > self.bundle_fetch_limit:
            return {}, (
                f"checkpoint is {cp['size']} bytes, over the viewer's fetch limit of "
                f"{self.bundle_fetch_limit}: logs not fetched"
            )
        with tempfile.TemporaryDirectory(prefix="mmshim-viewer-") as tmp:
            try:
                self.store.fetch(job, cp["checkpoint_id"], tmp)
            except StoreError as e:
                return {}, f"could not fetch the checkpoint: {e}"
            logs: dict[str, bytes] = {}
            base = Path(tmp, "logs")
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    p = Path(dirpath, name)
                    if p.is_file() and not p.is_symlink():
                        logs[p.relative_to(tmp).as_posix()] = p.read_bytes()
            return logs, None


class BadRequest(Exception):
    pass


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True, default=str).encode() + b"\n"


def _job_or_404(job_id: str) -> str:
    try:
        return validate_job_id(job_id)
    except InvalidJobId as e:
        raise NotFound(f"no such job: {e}") from None


def _int_param(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        v = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}")
    return v


def _parse_day(s: str) -> float:
    return float(calendar.timegm(time.strptime(s, "%Y-%m-%d")))


def _date_param(params: dict[str, str], name: str) -> float | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        return _parse_day(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a date YYYY-MM-DD") from None


# ---------------------------------------------------------------------------------------------
# The web app


def make_app(
    store_url: str,
    token: str | None = None,
    prices_path: str | os.PathLike[str] | None = None,
    **viewer_options: Any,
) -> Flask:
    """The viewer's Flask app over the store at store_url (token: required on every request)."""
    viewer = Viewer(store_url, prices_path, **viewer_options)
    app = Flask("mmshim.viewer", static_folder=None)
    app.config["VIEWER"] = viewer
    app.json.sort_keys = False  # type: ignore[attr-defined]

    def page(name: str, status: int = 200) -> Response:
        resp = send_from_directory(STATIC_DIR, name, max_age=0)
        resp.status_code = status
        return resp

    def is_api() -> bool:
        return request.path == API or request.path.startswith(API + "/")

    @app.before_request
    def check_token() -> Response | None:
        if not token:
            return None
        given = None
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[7:].strip()
        given = given or request.args.get("token") or request.cookies.get(TOKEN_COOKIE)
        if given and hmac.compare_digest(given.encode(), token.encode()):
            return None
        msg = "a valid access token is required (Authorization: Bearer TOKEN, or ?token=TOKEN)"
        if is_api():
            resp = jsonify(error="unauthorized", message=msg)
        else:
            resp = Response(
                f"<!doctype html><title>401 Unauthorized</title><h1>401 Unauthorized</h1><p>{msg}</p>",
                mimetype="text/html",
            )
        resp.status_code = 401
        resp.headers["WWW-Authenticate"] = 'Bearer realm="mmshim viewer"'
        return resp

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
        )
        if is_api():
            resp.headers.setdefault("Cache-Control", "no-store")
        tok = request.args.get("token")
        if token and tok and hmac.compare_digest(tok.encode(), token.encode()):
            resp.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
        return resp

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        if is_api():
            resp = jsonify(error=e.name.lower().replace(" ", "_"), message=e.description)
            resp.status_code = e.code or 500
            return resp
        if e.code == 404:
            return page("404.html", 404)
        return e.get_response()

    @app.errorhandler(BadRequest)
    def bad_request(e: BadRequest) -> Response:
        resp = jsonify(error="bad_request", message=str(e))
        resp.status_code = 400
        return resp

    @app.errorhandler(StoreError)
    def store_error(e: StoreError) -> Response:
        log.warning("store error: %s", e)
        resp = jsonify(error="store_error", message=str(e))
        resp.status_code = 502
        return resp

    @app.get("/")
    def index() -> Response:
        return page("index.html")

    @app.get("/jobs/<job_id>")
    def job_page(job_id: str) -> Response:
        if not viewer.exists(job_id):
            return page("404.html", 404)
        return page("job.html")

    @app.get("/static/<path:name>")
    def static_file(name: str) -> Response:
        return send_from_directory(STATIC_DIR, name, max_age=300)

    @app.get(f"{API}/overview")
    def api_overview() -> Response:
        return jsonify(viewer.overview())

    @app.get(f"{API}/jobs")
    def api_jobs() -> Response:
        return jsonify(viewer.jobs(request.args.to_dict()))

    @app.get(f"{API}/jobs/<job_id>")
    def api_job(job_id: str) -> Response:
        return jsonify(viewer.job(job_id))

    @app.get(f"{API}/jobs/<job_id>/bundle.tar.gz")
    def api_bundle(job_id: str) -> Response:
        buf = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)  # noqa: SIM115 (closed by stream)
        viewer.bundle(job_id, buf)
        size = buf.tell()
        buf.seek(0)
        name = "mmshim-" + _job_or_404(job_id).replace(":", "_") + "-logs.tar.gz"

        def stream() -> Iterable[bytes]:
            with buf:
                while chunk := buf.read(256 * 1024):
                    yield chunk

        return Response(
            stream(),
            mimetype="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(size)},
        )

    @app.get(f"{API}/series/daily")
    def api_daily() -> Response:
        return jsonify(viewer.daily(request.args.to_dict()))

    @app.get(f"{API}/prices")
    def api_prices() -> Response:
        return jsonify(viewer.prices)

    @app.get(f"{API}/")
    @app.get(API)
    def api_root() -> Response:
        return jsonify(
            version=1,
            store=viewer.store.url,
            endpoints=[f"{API}/overview", f"{API}/jobs", f"{API}/jobs/<job_id>",
                       f"{API}/jobs/<job_id>/bundle.tar.gz", f"{API}/series/daily", f"{API}/prices"],
        )  # fmt: skip

    return app


def serve(
    store_url: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    prices_path: str | os.PathLike[str] | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the viewer until interrupted (token falls back to $MMSHIM_VIEWER_TOKEN)."""
    from werkzeug.serving import make_server

    token = token or os.environ.get(TOKEN_ENV) or None
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving on %s without an access token: anyone who can reach it can read the store", host)
    app = make_app(store_url, token=token, prices_path=prices_path)
    app.config["VIEWER"].warm_up()
    server = make_server(host, port, app, threaded=True)
    url = f"http://{host}:{server.server_port}/"
    if ready is not None:
        ready(url)
    print(f"mmshim viewer of {store_url} on {url}" + (" (token required)" if token else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ---------------------------------------------------------------------------------------------
# Sample stores (demos, tests, benchmarks)

_SAMPLE_TYPES = ["m5.xlarge", "c5.2xlarge", "r5.2xlarge", "m6i.2xlarge", "c6i.4xlarge"]
_SAMPLE_QUEUES = ["genomics-spot", "render-spot", "ml-train-spot", "etl-ondemand"]
_SAMPLE_CHUNK = 64 * 1024 * 1024


class _SampleWriter:
    """Writes the store's documented repository format directly (no fsync): fast, for sample data."""

    def __init__(self, root: Path, rng: random.Random, keep: int = 2) -> None:
        self.root = root
        self.rng = rng
        self.keep = keep  # manifests kept per job, as `Store.retain(keep=2)` leaves them
        self.pending: list[tuple[str, bytes, CheckpointInfo]] = []
        self.digests: dict[str, dict[str, Any]] = {}
        self.made: set[str] = set()
        self.cctx = zstandard.ZstdCompressor(level=3)
        self.chunks: dict[bytes, tuple[str, int, int]] = {}
        self.last_us: dict[str, int] = {}

    def write(self, rel: str, data: bytes) -> None:
        path = f"{self.root}/{rel}"
        parent = path.rsplit("/", 1)[0]
        if parent not in self.made:
            os.makedirs(parent, exist_ok=True)
            self.made.add(parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def chunk(self, raw: bytes) -> tuple[str, int, int]:
        hit = self.chunks.get(raw) if len(raw) < 65536 else None
        if hit:
            return hit
        sha = chunk_hash(raw)
        comp = self.cctx.compress(raw)
        comp = comp if len(comp) < len(raw) else raw  # what does not compress is stored plain
        self.write(f"chunks/{sha[:2]}/{sha}", comp)
        out = (sha, len(raw), len(comp))
        if len(raw) < 65536:
            self.chunks[raw] = out
        return out

    def event(self, job: str, ev: dict[str, Any]) -> None:
        us = max(int(ev["time"] * 1e6), self.last_us.get(job, 0) + 1)
        self.last_us[job] = us
        secs, frac = divmod(us, 1_000_000)
        name = (
            time.strftime("%Y%m%dT%H%M%S", time.gmtime(secs)) + f".{frac:06d}Z-{self.rng.getrandbits(24):06x}"
        )
        self.write(f"jobs/{job}/events/{name}.json", json.dumps(ev, sort_keys=True).encode())
        digest.fold(self.digests.setdefault(job, digest.new()), ev, name)

    def checkpoint(
        self, job: str, created: float, files: list[dict[str, Any]], stored: int, meta: dict[str, Any]
    ) -> str:
        ms = int(created * 1000) % 1000
        cid = (
            time.strftime("%Y%m%dT%H%M%S", time.gmtime(created))
            + f".{ms:03d}Z-{self.rng.getrandbits(24):06x}"
        )
        size = sum(f["size"] for f in files)
        data = encode_manifest(
            {
                "format": FORMAT,
                "job_id": job,
                "checkpoint_id": cid,
                "created": created,
                "chunk_size": _SAMPLE_CHUNK,
                "compression": "zstd",
                "size": size,
                "stored": stored,
                "meta": meta,
                "files": files,
            }
        )
        info = CheckpointInfo(job, cid, created, size, stored, "good", meta)
        self.pending.append((f"jobs/{job}/checkpoints/{cid}.json", data, info))
        return cid

    def flush(self, job: str) -> None:
        """Write the newest `keep` manifests of the job just generated, then its digest."""
        doc = self.digests.pop(job, None) or digest.new()
        for rel, data, info in self.pending[len(self.pending) - self.keep :] if self.keep else []:
            self.write(rel, data)
            digest.set_checkpoint(doc, info.checkpoint_id, info)
        self.pending = []
        if doc["events"] or doc["checkpoints"]:
            self.write(f"jobs/{job}/digest.json", json.dumps(doc, sort_keys=True).encode())


def write_sample_store(
    root: str | os.PathLike[str],
    jobs: int = 200,
    seed: int = 1,
    days: int = 14,
    now: float | None = None,
) -> list[str]:
    """Fill a file store at `root` with `jobs` plausible jobs (events, checkpoints with CRIU logs)
    over the last `days` days; returns the job ids. Written straight in the store's format without
    fsync, so 10,000 jobs take seconds. The checkpoints' page images are all zeros (one shared
    chunk), so fetching one works but writes its full size."""
    rng = random.Random(seed)
    w = _SampleWriter(Path(root), rng)
    now = time.time() if now is None else now
    zero = w.chunk(b"\0" * _SAMPLE_CHUNK)
    ids = []
    for i in range(jobs):
        job = f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-" \
              f"{8 + rng.getrandbits(2):x}{rng.getrandbits(12):03x}-{rng.getrandbits(48):012x}"  # fmt: skip
        if i % 50 == 7:
            job += f":{rng.randrange(100)}"  # an array child
        ids.append(job)
        _sample_job(w, rng, job, now - rng.random() * days * 86400, now, zero)
        w.flush(job)
    return ids


def _sample_job(
    w: _SampleWriter, rng: random.Random, job: str, t: float, now: float, zero: tuple[str, int, int]
) -> None:
    queue = rng.choice(_SAMPLE_QUEUES)
    on_demand = queue.endswith("ondemand")
    itype = rng.choice(_SAMPLE_TYPES)
    vcpus = float(rng.choice([2, 4, 8]))
    pages = rng.randint(1, 24) * _SAMPLE_CHUNK // 4  # 16 MiB .. 384 MiB of memory
    interval = rng.choice([1800, 3600, 3600])
    work = rng.uniform(0.5, 8) * 3600  # compute seconds the job needs
    last_cp: tuple[str, float] | None = None
    attempt = 0
    while attempt < 5:
        attempt += 1
        host = f"ip-10-0-{rng.randrange(256)}-{rng.randrange(256)}.ec2.internal"
        base = {
            "job_id": job,
            "attempt": attempt,
            "container_id": f"{rng.getrandbits(64):016x}",
            "host": host,
            "instance_id": f"i-{rng.getrandbits(64):017x}"[:19],
            "instance_type": itype,
            "lifecycle": "on-demand" if on_demand else "spot",
            "queue": queue,
            "compute_env": queue.replace("-", "_") + "_ce",
            "vcpus": vcpus,
        }

        def ev(name: str, when: float, base: dict[str, Any] = base, **extra: Any) -> None:
            if when <= now:
                w.event(job, {**base, "time": when, "event": name, **extra})

        progress = 0.0
        if last_cp is not None:
            ev("restore.attempted", t, checkpoint_id=last_cp[0])
            t += rng.uniform(5, 60)
            if rng.random() < 0.9:
                ev("restore.succeeded", t, checkpoint_id=last_cp[0], duration_s=rng.uniform(5, 60),
                   progress_s=last_cp[1])  # fmt: skip
                progress = last_cp[1]
            else:
                reason = rng.choice(  # as the runtime words them
                    [
                        "EngineError: runc restore failed (1); CRIU's log: (00.412345) Error "
                        "(criu/files-reg.c:2173): File /data/ref.fa has bad size 1048576 (expect 2097152)",
                        "no good checkpoint in the store",
                        "EngineError: no checkpoint of this job can be restored here: "
                        f"{last_cp[0]}: this host's CPU cannot run what was checkpointed on a "
                        "c5.2xlarge; CRIU: Error (criu/arch/x86/cpu.c:274): cpu: CPU xsave size "
                        "mismatch (2696/832)",
                    ]
                )
                ev("restore.fallback", t, checkpoint_id=last_cp[0], reason=reason)
                ev("start", t)
        else:
            ev("start", t)
        reclaim_at = t + rng.expovariate(1 / (6 * 3600)) if not on_demand else math.inf
        next_cp = t + interval
        run_from = t
        while True:
            remaining = work - progress
            finish = run_from + remaining
            if next_cp < min(finish, reclaim_at) and next_cp <= now:
                if rng.random() < 0.04:
                    ev("checkpoint.started", next_cp, trigger="interval")
                    ev("checkpoint.failed", next_cp + 3, trigger="interval",
                       reason="EngineError: runc checkpoint failed (1); CRIU's log: (00.017025) "
                              "Error (criu/bfd.c:131): bfd: Error flushing image: No space left on "
                              "device")  # fmt: skip
                else:
                    last_cp = _sample_checkpoint(w, rng, job, ev, next_cp, "interval", pages,
                                                 progress + next_cp - run_from, zero)  # fmt: skip
                progress += next_cp - run_from
                run_from = next_cp
                next_cp += interval
                continue
            break
        if reclaim_at < finish and reclaim_at <= now:
            ev("spot.notice", reclaim_at - 120, action="terminate", notice_time=reclaim_at)
            if rng.random() < 0.85:
                ev("checkpoint.started", reclaim_at - 118, trigger="spot")
                last_cp = _sample_checkpoint(w, rng, job, ev, reclaim_at - 118, "spot", pages,
                                             progress + reclaim_at - 118 - run_from, zero)  # fmt: skip
            if rng.random() < 0.5:
                ev("exit", reclaim_at - 1, exit_code=137)
            t = reclaim_at + rng.uniform(120, 1800)
            if t > now:
                return
            continue
        if finish <= now:
            ev("exit", finish, exit_code=0 if rng.random() < 0.95 else 1)
        return


def _sample_checkpoint(
    w: _SampleWriter,
    rng: random.Random,
    job: str,
    ev: Callable[..., None],
    when: float,
    trigger: str,
    pages: int,
    progress: float,
    zero: tuple[str, int, int],
) -> tuple[str, float]:
    log_text = (
        "(00.000000) Version: 4.1.1 (gitid 0)\n"
        f"(00.000100) Dumping processes (pid: {rng.choice([1, 7, 42, 311, 2048])})\n"
        f"(0{rng.randrange(1, 9)}.{rng.randrange(4) * 250000:06d}) Dumping finished successfully\n"
    ).encode()
    logc = w.chunk(log_text)
    n = max(1, pages // _SAMPLE_CHUNK)
    files = [
        {"name": "criu/pages-1.img", "size": n * zero[1], "mode": 0o600, "chunks": [list(zero)] * n},
        {"name": "logs/dump.log", "size": len(log_text), "mode": 0o644, "chunks": [list(logc)]},
    ]
    stored = int(n * zero[1] * rng.uniform(0.05, 0.5))
    duration = rng.uniform(2, 40) * n / 4 + 1
    frozen = duration * rng.uniform(0.2, 0.6)
    created = when + 1
    meta = {"trigger": trigger, "progress_s": round(progress, 3)}
    cid = w.checkpoint(job, created, files, stored, meta)
    if trigger == "interval":
        ev("checkpoint.started", when, trigger=trigger)
    ev("checkpoint.committed", when + duration, checkpoint_id=cid, trigger=trigger, size=n * zero[1],
       stored=stored, duration_s=duration, frozen_s=frozen)  # fmt: skip
    return cid, progress


# ---------------------------------------------------------------------------------------------
# Command line (mmshimctl serve wraps serve())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mmshim.viewer", description=__doc__.split("\n")[0])
    ap.add_argument("store", help="store URL: file:///path or s3://bucket/prefix")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--token", default=None, help=f"access token (default ${TOKEN_ENV})")
    ap.add_argument("--prices", default=None, help="price table JSON (default the shipped prices.json)")
    ap.add_argument("--sample", type=int, default=0, metavar="N", help="write N sample jobs first (file://)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.sample:
        path = args.store[len("file://") :] if args.store.startswith("file://") else args.store
        write_sample_store(path, jobs=args.sample)
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.store, args.host, args.port, args.token, args.prices)


if __name__ == "__main__":
    main()

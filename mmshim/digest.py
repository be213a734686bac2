"""A job's history boiled down to one small document, kept next to the job in the store.

Why: a viewer over 10,000 jobs cannot read 170,000 event files and fold them on every start; it
reads one digest per job instead. The store folds each event into the job's digest when it stores
the event (Store.put_event) and records checkpoint changes as they happen (save, retain, delete,
bad marks). A digest is derived data: ``build`` makes it again from the events and checkpoints,
which the viewer does for a job's page and for a job whose digest is missing.

Folding tolerates events arriving out of time order (one job's events come from several
processes: the runtime restoring an attempt, that attempt's watcher, an operator's mmshimctl) and
knows no prices and no clock: ``view`` applies both when the viewer asks.

Document (JSON): {"format": 1, "events": n, "recent": [event ids], "last": {"time", "event"},
"current": attempt, "attempts": {"<n>": attempt}, "days": {"YYYY-mm-dd": {counter: value}},
"rebalance": n, "checkpoints": {checkpoint_id: [created, size, stored, state]}}.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from mmshim import pricing

FORMAT = 1
RECENT = 8  # event ids remembered, so that a retried fold of the same event counts it once
NOTICE_LEAD = 120.0  # a Spot notice gives two minutes
IDENTITY = ("host", "instance_id", "instance_type", "lifecycle", "queue", "compute_env")
DAY_FIELDS = (
    "checkpoints",
    "ckpt_size",
    "ckpt_size_max",
    "ckpt_stored",
    "ckpt_duration",
    "ckpt_duration_max",
    "ckpt_frozen",
    "ckpt_timed",
    "ckpt_failed",
    "restores_attempted",
    "restores_succeeded",
    "fallbacks",
    "spot_notices",
    "instance_hours",
    "cost_usd",
    "on_demand_usd",
    "kept_usd",
    "kept_vcpu_hours",
)
MAX_FIELDS = frozenset(k for k in DAY_FIELDS if k.endswith("_max"))
# An attempt as folded, plus the times that order some of its fields (mode_t, spot_t, exit_t);
# a view drops those and adds outcome, instance_hours, cost_usd, on_demand_usd, kept_* .
FOLDED = (
    "attempt", "start", "end", *IDENTITY, "vcpus", "container_ids", "mode", "restored_from",
    "restore_duration_s", "progress_s", "fallback_reason", "checkpoints", "checkpoints_failed",
    "spot_notice", "spot_action", "rebalance", "exit_code", "events",
)  # fmt: skip


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


_day_names: dict[int, str] = {}


def day_name(t: float) -> str:
    """UTC day of t, as YYYY-mm-dd (memoized: folding and views ask for the same few days)."""
    n = int(t // 86400)
    name = _day_names.get(n)
    if name is None:
        name = _day_names[n] = time.strftime("%Y-%m-%d", time.gmtime(n * 86400))
    return name


def _split_days(start: float, end: float) -> Iterable[tuple[str, float]]:
    """(UTC day, seconds of [start, end] that fall in it)."""
    t = start
    while t < end:
        stop = min(end, (math.floor(t / 86400) + 1) * 86400)
        yield day_name(t), stop - t
        t = stop


def new() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "events": 0,
        "recent": [],
        "last": None,
        "current": 1,
        "attempts": {},
        "days": {},
        "rebalance": 0,
        "checkpoints": {},
    }


def usable(doc: Any) -> bool:
    """A digest this code can read (another format, or damage, means: build it from the events)."""
    return (
        isinstance(doc, dict)
        and doc.get("format") == FORMAT
        and isinstance(doc.get("attempts"), dict)
        and isinstance(doc.get("days"), dict)
        and isinstance(doc.get("checkpoints"), dict)
        and isinstance(doc.get("recent"), list)
    )


def _new_attempt(n: int, t: float) -> dict[str, Any]:
    a: dict[str, Any] = dict.fromkeys(FOLDED)
    a.update(attempt=n, start=t, end=t, container_ids=[], mode="unknown", checkpoints=0,
             checkpoints_failed=0, events=0, mode_t=None, spot_t=None, exit_t=None)  # fmt: skip
    return a


def _later(a: dict[str, Any], key: str, t: float) -> bool:
    """Whether an event at t is the newest of its kind for `key` (and record it)."""
    if a[key] is not None and t < a[key]:
        return False
    a[key] = t
    return True


def _add(day: dict[str, float], key: str, v: float) -> None:
    day[key] = day.get(key, 0.0) + v


def _max(day: dict[str, float], key: str, v: float) -> None:
    day[key] = max(day.get(key, 0.0), v)


def fold(doc: dict[str, Any], ev: dict[str, Any], event_id: str | None = None) -> bool:
    """Add one event to the digest; False if it is not an event or event_id was folded already."""
    t = _num(ev.get("time")) if isinstance(ev, dict) else None
    if t is None:
        return False
    if event_id is not None:
        if event_id in doc["recent"]:
            return False
        doc["recent"] = [*doc["recent"], event_id][-RECENT:]
    n = ev.get("attempt")
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        doc["current"] = n
    else:
        n = doc["current"]
    a = doc["attempts"].get(str(n))
    if a is None:
        a = doc["attempts"][str(n)] = _new_attempt(n, t)
    a["start"], a["end"] = min(a["start"], t), max(a["end"], t)
    a["events"] += 1
    doc["events"] += 1
    name = ev.get("event")
    if doc["last"] is None or t >= doc["last"]["time"]:
        doc["last"] = {"time": t, "event": name}
    for k in IDENTITY:
        v = ev.get(k)
        if a[k] is None and isinstance(v, str) and v:
            a[k] = v
    if a["vcpus"] is None and _num(ev.get("vcpus")):
        a["vcpus"] = _num(ev.get("vcpus"))
    cid = ev.get("container_id")
    if isinstance(cid, str) and cid and cid not in a["container_ids"]:
        a["container_ids"].append(cid)
    day = doc["days"].setdefault(day_name(t), {})
    if name == "start":
        if a["mode"] == "unknown":
            a["mode"] = "fresh"
    elif name == "restore.attempted":
        _add(day, "restores_attempted", 1)
        a["restored_from"] = a["restored_from"] or ev.get("checkpoint_id")
    elif name == "restore.succeeded":
        _add(day, "restores_succeeded", 1)
        a["restored_from"] = ev.get("checkpoint_id") or a["restored_from"]
        if _later(a, "mode_t", t):
            a["mode"] = "restored"
            a["restore_duration_s"] = _num(ev.get("duration_s"))
            a["progress_s"] = _num(ev.get("progress_s"))
    elif name == "restore.fallback":
        _add(day, "fallbacks", 1)
        if _later(a, "mode_t", t):
            a["mode"] = "fallback"
            a["fallback_reason"] = str(ev.get("reason") or "")
    elif name == "checkpoint.committed":
        a["checkpoints"] += 1
        size, dur = _num(ev.get("size")) or 0.0, _num(ev.get("duration_s"))
        _add(day, "checkpoints", 1)
        _add(day, "ckpt_size", size)
        _max(day, "ckpt_size_max", size)
        _add(day, "ckpt_stored", _num(ev.get("stored")) or 0.0)
        if dur is not None:
            _add(day, "ckpt_timed", 1)
            _add(day, "ckpt_duration", dur)
            _max(day, "ckpt_duration_max", dur)
            _add(day, "ckpt_frozen", _num(ev.get("frozen_s")) or 0.0)
    elif name == "checkpoint.failed":
        a["checkpoints_failed"] += 1
        _add(day, "ckpt_failed", 1)
    elif name == "spot.notice":
        _add(day, "spot_notices", 1)
        if _later(a, "spot_t", t):
            a["spot_notice"] = _num(ev.get("notice_time")) or t
            a["spot_action"] = ev.get("action") if isinstance(ev.get("action"), str) else None
    elif name == "rebalance":
        doc["rebalance"] += 1
        a["rebalance"] = _num(ev.get("notice_time")) or t
    elif name == "exit" and _later(a, "exit_t", t):
        code = ev.get("exit_code")
        a["exit_code"] = code if isinstance(code, int) and not isinstance(code, bool) else -1
    return True


def set_checkpoint(doc: dict[str, Any], checkpoint_id: str, info: Any | None) -> bool:
    """Record a checkpoint (a CheckpointInfo) or its deletion (None); False if nothing changed."""
    cps = doc["checkpoints"]
    if info is None:
        return cps.pop(checkpoint_id, None) is not None
    row = [info.created, info.size, info.stored, info.state]
    if cps.get(checkpoint_id) == row:
        return False
    cps[checkpoint_id] = row
    return True


def mark_bad(doc: dict[str, Any], checkpoint_id: str) -> bool:
    """A recorded checkpoint turned out unusable; False if nothing changed."""
    row = doc["checkpoints"].get(checkpoint_id)
    if row is None or row[3] == "bad":
        return False
    row[3] = "bad"
    return True


def build(
    events: Iterable[dict[str, Any]], checkpoints: Iterable[Any], ids: Iterable[str] | None = None
) -> dict[str, Any]:
    """The digest of a job from its events (with their store ids, when known) and its checkpoints
    (CheckpointInfo), folded in time order."""
    doc = new()
    pairs = zip(ids, events, strict=True) if ids is not None else ((None, e) for e in events)
    timed = [(i, e) for i, e in pairs if isinstance(e, dict) and _num(e.get("time")) is not None]
    for i, ev in sorted(timed, key=lambda p: p[1]["time"]):
        fold(doc, ev, i)
    for c in checkpoints:
        set_checkpoint(doc, c.checkpoint_id, c)
    return doc


def view(
    job_id: str, doc: dict[str, Any], prices: dict[str, Any], now: float, stale_after: float
) -> dict[str, Any]:
    """The digest with outcomes and status as of `now`, hours and money priced with `prices`:
    {"summary", "attempts", "days" (sparse: absent counters are 0), "totals" (every DAY_FIELD,
    over all days), "unpriced", "lifecycle_hours", "costs"}. One pass: a viewer's first load
    makes one view per job."""
    days = {name: dict(d) for name, d in doc["days"].items()}
    totals = dict.fromkeys(DAY_FIELDS, 0.0)
    for d in days.values():
        for k, v in d.items():
            totals[k] = max(totals[k], v) if k in MAX_FIELDS else totals[k] + v
    unpriced: dict[str, float] = {}
    hours = {"spot": 0.0, "on-demand": 0.0, "unknown": 0.0}
    costs = {"on_demand_usd": 0.0, "kept_on_demand_usd": 0.0, "spot_usd": 0.0, "other_usd": 0.0}
    order = sorted(doc["attempts"].values(), key=lambda a: a["attempt"])
    attempts = []
    cost_total: float | None = None
    for i, src in enumerate(order):
        a = dict(src)  # the doc is not used again: its lists may be shared
        del a["mode_t"], a["spot_t"], a["exit_t"]
        notice = a["spot_notice"]
        if a["exit_code"] is not None:
            a["outcome"] = "succeeded" if a["exit_code"] == 0 else ("reclaimed" if notice else "failed")
        elif i < len(order) - 1:
            a["outcome"] = "reclaimed" if notice else "lost"
        elif notice and now > notice + 60:
            a["outcome"] = "reclaimed"
        else:
            a["outcome"] = "running"
        end = a["end"]
        if a["outcome"] == "reclaimed" and notice:
            end = max(end, min(notice, a["end"] + NOTICE_LEAD))
        a["instance_hours"] = max(0.0, end - a["start"]) / 3600
        lifecycle = a["lifecycle"] if a["lifecycle"] in ("spot", "on-demand") else "unknown"
        hours[lifecycle] += a["instance_hours"]
        rates = pricing.rates(prices, a["instance_type"], a["lifecycle"], a["vcpus"])
        kept_s = a["progress_s"] if a["mode"] == "restored" and a["progress_s"] else 0.0
        a["kept_vcpu_hours"] = kept_s * (a["vcpus"] or 1.0) / 3600
        a["cost_usd"] = a["on_demand_usd"] = a["kept_usd"] = None
        if rates is None:
            if a["instance_hours"]:
                key = a["instance_type"] or "(unknown)"
                unpriced[key] = unpriced.get(key, 0.0) + a["instance_hours"]
        else:
            paid, od = rates
            a["cost_usd"], a["on_demand_usd"] = a["instance_hours"] * paid, a["instance_hours"] * od
            cost_total = (cost_total or 0.0) + a["cost_usd"]
            costs["on_demand_usd"] += a["on_demand_usd"]
            costs["spot_usd" if a["lifecycle"] == "spot" else "other_usd"] += a["cost_usd"]
            if kept_s:
                a["kept_usd"] = kept_s / 3600 * paid
                costs["kept_on_demand_usd"] += kept_s / 3600 * od
        spent = [("instance_hours", 1.0)]
        if rates is not None:
            spent += [("cost_usd", rates[0]), ("on_demand_usd", rates[1])]
        for name, secs in _split_days(a["start"], end):
            d = days.setdefault(name, {})
            for k, rate in spent:
                _add(d, k, secs / 3600 * rate)
                totals[k] += secs / 3600 * rate
        if a["kept_vcpu_hours"]:
            d = days.setdefault(day_name(a["start"]), {})
            for k, v in (("kept_vcpu_hours", a["kept_vcpu_hours"]), ("kept_usd", a["kept_usd"] or 0.0)):
                _add(d, k, v)
                totals[k] += v
        attempts.append(a)

    last, events_last = (attempts[-1] if attempts else None), doc["last"]
    if last is None:
        status = "unknown"
    elif last["outcome"] == "running":
        if events_last and events_last["event"] == "restore.attempted":
            status = "restoring"
        elif events_last and now - events_last["time"] > stale_after:
            status = "stale"
        else:
            status = "running"
    elif last["outcome"] in ("reclaimed", "lost"):
        status = "interrupted"
    else:
        status = last["outcome"]

    cps = doc["checkpoints"].values()
    summary = {
        "job_id": job_id,
        "status": status,
        "queue": next((a["queue"] for a in attempts if a["queue"]), None),
        "compute_env": next((a["compute_env"] for a in attempts if a["compute_env"]), None),
        "attempts": len(attempts),
        "checkpoints": len(cps),
        "checkpoints_good": sum(1 for c in cps if c[3] == "good"),
        "checkpoints_committed": int(totals["checkpoints"]),
        "checkpoints_failed": int(totals["ckpt_failed"]),
        "bytes_stored": sum(c[2] for c in cps),
        "bytes_raw": sum(c[1] for c in cps),
        "latest_checkpoint": max((c[0] for c in cps), default=None),
        "first_event": attempts[0]["start"] if attempts else None,
        "last_event": dict(events_last) if events_last else None,
        "restores_attempted": int(totals["restores_attempted"]),
        "restores_succeeded": int(totals["restores_succeeded"]),
        "fallbacks": int(totals["fallbacks"]),
        "restored": totals["restores_succeeded"] > 0,
        "spot_notices": int(totals["spot_notices"]),
        "rebalance_notices": doc["rebalance"],
        "protected": bool(cps) or totals["checkpoints"] > 0,
        "instance_types": sorted({a["instance_type"] for a in attempts if a["instance_type"]}),
        "hosts": [a["host"] for a in attempts if a["host"]],
        "kept_vcpu_hours": totals["kept_vcpu_hours"],
        "cost_usd": cost_total,
        "exit_code": last["exit_code"] if last else None,
    }
    return {
        "summary": summary,
        "attempts": attempts,
        "days": days,
        "totals": totals,
        "unpriced": unpriced,
        "lifecycle_hours": hours,
        "costs": costs,
    }

"""An EC2 Instance Metadata Service (IMDSv2) emulator, for tests, the demo and users' own testing.

It serves just what mmshim reads, on a loopback address: the IMDSv2 token flow, a few instance
metadata keys, and the Spot interruption notice and rebalance recommendation, which answer 404
until triggered, by HTTP, by the CLI or from Python. Faults can be injected to exercise the
watcher's resilience.

    python -m mmshim.imds_emulator serve --host 127.0.0.1 --port 1338 [--pid-file F]
    python -m mmshim.imds_emulator spot --action terminate --endpoint http://127.0.0.1:1338
    python -m mmshim.imds_emulator rebalance|reset|state --endpoint http://127.0.0.1:1338
    python -m mmshim.imds_emulator fault --mode hang --count 2 --endpoint http://127.0.0.1:1338

Control endpoints (never subject to tokens or faults): POST /mmshim/spot?action=terminate,
POST /mmshim/rebalance, POST /mmshim/reset, POST /mmshim/fault?mode=MODE&count=N,
GET /mmshim/state. Fault modes, each for the next N requests under /latest/:
  500            answer 500
  hang           answer nothing for --hang-seconds (or until the emulator stops), then close
  badjson        answer 200 with a truncated JSON body (metadata GETs only, not token PUTs)
  expire-tokens  answer 401 to metadata GETs and revoke the token they carried

Standard library only; argparse rather than click since this is a development tool.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

TOKEN_PATH = "/latest/api/token"
META_PREFIX = "/latest/meta-data/"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL = 21600
SPOT_KEY = "spot/instance-action"
SPOT_TIME_KEY = "spot/termination-time"  # the older key, present for "terminate" notices
REBALANCE_KEY = "events/recommendations/rebalance"
SPOT_ACTIONS = ("terminate", "stop", "hibernate")
FAULT_MODES = ("500", "hang", "badjson", "expire-tokens")
DEFAULT_PORT = 1338  # the port of amazon-ec2-metadata-mock, so habits carry over

DEFAULT_METADATA: dict[str, str] = {
    "ami-id": "ami-0123456789abcdef0",
    "instance-id": "i-0123456789abcdef0",
    "instance-type": "m5.large",
    "instance-life-cycle": "spot",
    "placement/availability-zone": "us-east-1a",
    "placement/region": "us-east-1",
}


def _iso(t: datetime) -> str:
    """IMDS's timestamp format: UTC, whole seconds, a literal Z."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _State:
    """Everything the handlers share, behind one lock (handlers run in their own threads)."""

    def __init__(
        self, metadata: dict[str, str | None] | None, allow_v1: bool, hang_seconds: float, notice_lead: float
    ) -> None:
        merged: dict[str, str | None] = {**DEFAULT_METADATA, **(metadata or {})}
        self.metadata = {k.strip("/"): v for k, v in merged.items() if v is not None}
        self.allow_v1 = allow_v1
        self.hang_seconds = hang_seconds
        self.notice_lead = notice_lead
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # releases handlers stuck in a "hang" fault on stop()
        self.tokens: dict[str, float] = {}  # token -> time.monotonic() at which it expires
        self.spot: dict[str, str] | None = None
        self.rebalance: dict[str, str] | None = None
        self.fault_mode: str | None = None
        self.fault_left = 0
        self.stats = {"requests": 0, "tokens_issued": 0, "unauthorized": 0, "faults_served": 0}

    def take_fault(self, is_get: bool) -> str | None:
        """The fault to serve to this /latest/ request, if any, counting it off."""
        with self.lock:
            mode = self.fault_mode
            if mode is None or (mode in ("badjson", "expire-tokens") and not is_get):
                return None
            self.fault_left -= 1
            if self.fault_left <= 0:
                self.fault_mode = None
            self.stats["faults_served"] += 1
            return mode

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "spot": self.spot,
                "rebalance": self.rebalance,
                "fault": {"mode": self.fault_mode, "count": self.fault_left} if self.fault_mode else None,
                "allow_v1": self.allow_v1,
                **self.stats,
            }


class _Handler(BaseHTTPRequestHandler):
    server_version = "EC2ws"
    sys_version = ""
    server: _Server

    # -- dispatch -------------------------------------------------------------------------

    def do_GET(self) -> None:
        path, _ = self._split()
        if path == "/mmshim/state":
            self._send(200, json.dumps(self.server.state.snapshot()), "application/json")
        elif path.startswith("/latest/"):
            self._latest("GET", path)
        else:
            self._send(404, "Not Found")

    def do_PUT(self) -> None:
        path, _ = self._split()
        if path.startswith("/latest/"):
            self._latest("PUT", path)
        else:
            self._send(404, "Not Found")

    def do_POST(self) -> None:
        path, query = self._split()
        if path == "/mmshim/spot":
            action = query.get("action", "terminate")
            if action not in SPOT_ACTIONS:
                return self._send(400, f"action must be one of {', '.join(SPOT_ACTIONS)}\n")
            body = self.server.emulator.trigger_spot(action)
        elif path == "/mmshim/rebalance":
            body = self.server.emulator.trigger_rebalance()
        elif path == "/mmshim/reset":
            self.server.emulator.reset()
            body = {}
        elif path == "/mmshim/fault":
            mode, count = query.get("mode", ""), query.get("count", "1")
            if mode not in FAULT_MODES or not count.isdigit() or int(count) < 1:
                return self._send(400, f"need mode in {', '.join(FAULT_MODES)} and count >= 1\n")
            self.server.emulator.fault(mode, int(count))
            body = {"mode": mode, "count": int(count)}
        else:
            return self._send(404, "Not Found")
        self._send(200, json.dumps(body) + "\n", "application/json")

    # -- IMDS -----------------------------------------------------------------------------

    def _latest(self, method: str, path: str) -> None:
        state = self.server.state
        with state.lock:
            state.stats["requests"] += 1
        fault = state.take_fault(is_get=method == "GET")
        if fault == "500":
            return self._send(500, "Internal Server Error")
        if fault == "hang":
            state.stopping.wait(state.hang_seconds)
            self.close_connection = True  # close without a response
            return None
        if method == "PUT":
            return self._put_token(path)
        if path.startswith(META_PREFIX) or path == META_PREFIX.rstrip("/"):
            if not self._authorized(revoke=fault == "expire-tokens"):
                return self._send(401, "Unauthorized")
            if fault == "badjson":
                return self._send(200, '{"action": "terminate", "time": "2026-')
            return self._metadata(path[len(META_PREFIX) :].strip("/"))
        return self._send(404, "Not Found")

    def _put_token(self, path: str) -> None:
        if path != TOKEN_PATH:
            return self._send(405 if path.startswith(META_PREFIX) else 404, "Not Allowed")
        if self.headers.get("X-Forwarded-For"):  # IMDS refuses tokens to requests through a proxy
            return self._send(403, "Forbidden")
        ttl = (self.headers.get(TOKEN_TTL_HEADER) or "").strip()
        if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TOKEN_TTL:
            return self._send(400, "Bad Request")
        token = secrets.token_urlsafe(42)
        state = self.server.state
        with state.lock:
            now = time.monotonic()
            state.tokens = {t: exp for t, exp in state.tokens.items() if exp > now}  # prune
            state.tokens[token] = now + int(ttl)
            state.stats["tokens_issued"] += 1
        self._send(200, token, extra={TOKEN_TTL_HEADER: ttl})

    def _authorized(self, revoke: bool) -> bool:
        """IMDSv2: a valid, unexpired token. A present but bad token fails even with IMDSv1 allowed."""
        token = self.headers.get(TOKEN_HEADER)
        state = self.server.state
        with state.lock:
            if token is None:
                ok = state.allow_v1 and not revoke
            else:
                expiry = state.tokens.get(token)
                ok = expiry is not None and expiry > time.monotonic() and not revoke
                if revoke:
                    state.tokens.pop(token, None)
            if not ok:
                state.stats["unauthorized"] += 1
            return ok

    def _metadata(self, key: str) -> None:
        state = self.server.state
        with state.lock:
            values = dict(state.metadata)
            if state.spot:
                values[SPOT_KEY] = json.dumps(state.spot)
                if state.spot["action"] == "terminate":
                    values[SPOT_TIME_KEY] = state.spot["time"]
            if state.rebalance:
                values[REBALANCE_KEY] = json.dumps(state.rebalance)
        if key in values:
            return self._send(200, values[key])
        # A directory: list its entries the way IMDS does, subdirectories with a trailing slash.
        prefix = f"{key}/" if key else ""
        entries = sorted(
            {
                k[len(prefix) :].split("/", 1)[0] + ("/" if "/" in k[len(prefix) :] else "")
                for k in values
                if k.startswith(prefix)
            }
        )
        if entries:
            return self._send(200, "\n".join(entries))
        return self._send(404, "Not Found")

    # -- helpers --------------------------------------------------------------------------

    def _split(self) -> tuple[str, dict[str, str]]:
        parts = urlsplit(self.path)
        return parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}

    def _send(
        self, status: int, body: str, ctype: str = "text/plain", extra: dict[str, str] | None = None
    ) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler must not keep the process alive
    state: _State
    emulator: Emulator
    verbose: bool


class Emulator:
    """The emulator as a Python object: `Emulator().start()` serves on 127.0.0.1, a free port.

    Triggers and faults act on the shared state directly, the same as their HTTP counterparts.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        metadata: dict[str, str | None] | None = None,
        allow_v1: bool = False,
        hang_seconds: float = 30.0,
        notice_lead: float = 120.0,
        verbose: bool = False,
    ) -> None:
        """`metadata` overrides or (with None) removes keys of DEFAULT_METADATA, by path under
        /latest/meta-data/; `notice_lead` is how far ahead of now a Spot notice's time lies."""
        self.host, self.port = host, port
        self.state = _State(metadata, allow_v1, hang_seconds, notice_lead)
        self.verbose = verbose
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Emulator:
        server = _Server((self.host, self.port), _Handler)
        server.state, server.emulator, server.verbose = self.state, self, self.verbose
        self._server, self.port = server, server.server_address[1]
        # A short poll interval so that stop() (shutdown waits for the loop to notice) is quick.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="imds-emulator", daemon=True
        )
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def trigger_spot(self, action: str = "terminate") -> dict[str, str]:
        """Post a Spot interruption notice: `action` at now + notice_lead."""
        if action not in SPOT_ACTIONS:
            raise ValueError(f"action must be one of {SPOT_ACTIONS}, not {action!r}")
        when = datetime.now(UTC) + timedelta(seconds=self.state.notice_lead)
        notice = {"action": action, "time": _iso(when)}
        with self.state.lock:
            self.state.spot = notice
        return notice

    def trigger_rebalance(self) -> dict[str, str]:
        """Post a rebalance recommendation, issued now."""
        notice = {"noticeTime": _iso(datetime.now(UTC))}
        with self.state.lock:
            self.state.rebalance = notice
        return notice

    def reset(self) -> None:
        """Withdraw the notices and cancel any pending fault; tokens stay valid."""
        with self.state.lock:
            self.state.spot = self.state.rebalance = None
            self.state.fault_mode, self.state.fault_left = None, 0

    def fault(self, mode: str, count: int = 1) -> None:
        """Make the next `count` requests under /latest/ fail as `mode` (replaces a pending fault)."""
        if mode not in FAULT_MODES or count < 1:
            raise ValueError(f"mode must be one of {FAULT_MODES} and count >= 1")
        with self.state.lock:
            self.state.fault_mode, self.state.fault_left = mode, count

    def stats(self) -> dict:
        """Counters and state, as GET /mmshim/state returns them."""
        return self.state.snapshot()

    def stop(self) -> None:
        self.state.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Emulator:
        return self if self._server else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- CLI ----------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    metadata: dict[str, str | None] = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--metadata takes KEY=VALUE (empty VALUE removes the key), not {item!r}")
        metadata[key] = value or None
    emu = Emulator(
        args.host,
        args.port,
        metadata=metadata,
        allow_v1=args.allow_v1,
        hang_seconds=args.hang_seconds,
        verbose=args.verbose,
    ).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    pid_file: Path | None = args.pid_file
    if pid_file:  # written once listening, so its existence means ready
        tmp = pid_file.with_name(pid_file.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(pid_file)
    print(f"mmshim IMDS emulator listening on {emu.endpoint}", flush=True)
    try:
        while not stop.wait(3600):
            pass
    finally:
        emu.stop()
        if pid_file:
            pid_file.unlink(missing_ok=True)
    return 0


def _control(endpoint: str, method: str, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """One request to a running emulator (http.client: no proxy may come between)."""
    parts = urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"--endpoint must be an http:// URL, not {endpoint!r}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request(method, parts.path.rstrip("/") + path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as e:
        raise SystemExit(f"cannot reach the emulator at {endpoint}: {e}") from e
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmshim.imds_emulator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the emulator until SIGTERM/SIGINT")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    serve.add_argument("--pid-file", type=Path)
    serve.add_argument("--allow-v1", action="store_true", help="also answer GETs without a token")
    serve.add_argument("--hang-seconds", type=float, default=30.0, help="how long a 'hang' fault hangs")
    serve.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a key under /latest/meta-data/, e.g. instance-type=c5.xlarge",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")

    def control(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--endpoint", default=f"http://127.0.0.1:{DEFAULT_PORT}")
        return p

    control("spot", "post a Spot interruption notice").add_argument(
        "--action", choices=SPOT_ACTIONS, default="terminate"
    )
    control("rebalance", "post a rebalance recommendation")
    control("reset", "withdraw notices and pending faults")
    control("state", "print the emulator's state and counters")
    fault = control("fault", "make the next requests fail")
    fault.add_argument("--mode", choices=FAULT_MODES, required=True)
    fault.add_argument("--count", type=int, default=1)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "state":
        status, body = _control(args.endpoint, "GET", "/mmshim/state")
    else:
        path = f"/mmshim/{args.command}"
        if args.command == "spot":
            path += f"?action={args.action}"
        elif args.command == "fault":
            path += f"?mode={args.mode}&count={args.count}"
        status, body = _control(args.endpoint, "POST", path)
    print(body.rstrip("\n"))
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())

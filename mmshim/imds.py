"""A small IMDSv2 client for the watcher: the Spot interruption notice, rebalance, instance facts.

Standard library only, and http.client rather than urllib: the watcher is a long-lived process
that must stay light, and urllib would honour HTTP(S)_PROXY, which must never apply to the
link-local metadata service (the AWS SDKs bypass proxies for it too).

Every failure the caller can do nothing about but wait (timeout, refused connection, 5xx, a body
that is not the documented JSON) is raised as `ImdsUnavailable`; the watcher retries with
`Backoff`. Timeouts are short because IMDS is on the host: a hung IMDS must not stall the
watcher past the two minutes a Spot notice gives.

Note: with the instance's default PUT response hop limit of 1, a token request from inside a
bridged container never gets its answer and times out; the watcher runs on the host.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "http://169.254.169.254"
DEFAULT_ENDPOINT_IPV6 = "http://[fd00:ec2::254]"
ENDPOINT_ENV = "MMSHIM_IMDS_ENDPOINT"
SDK_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
SDK_ENDPOINT_MODE_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"

TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL = 21600
# Refresh this long before the token's TTL ends (capped at a tenth of the TTL for short TTLs),
# so that a request never goes out with a token about to expire on its way.
TOKEN_REFRESH_MARGIN = 60.0

SPOT_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
INSTANCE_INFO_PATHS = {
    "instance-id": "/latest/meta-data/instance-id",
    "instance-type": "/latest/meta-data/instance-type",
    "availability-zone": "/latest/meta-data/placement/availability-zone",
    "instance-life-cycle": "/latest/meta-data/instance-life-cycle",
}
MAX_BODY = 64 * 1024  # metadata values are tiny; never buffer an unbounded answer


class ImdsUnavailable(Exception):
    """IMDS did not give a usable answer; transient as far as the caller knows, so retry later.

    `status` is the HTTP status when there was a response, None for network-level failures.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Notice:
    """A Spot interruption notice (kind "spot") or a rebalance recommendation (kind "rebalance").

    `time` is IMDS's own ISO 8601 UTC string: for "spot" when the instance will be interrupted,
    for "rebalance" when the recommendation was issued. `action` is None for "rebalance".
    """

    kind: str
    action: str | None
    time: str


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The endpoint to use: the argument, else MMSHIM_IMDS_ENDPOINT, else the AWS SDK's variables."""
    if endpoint:
        return endpoint.rstrip("/")
    for var in (ENDPOINT_ENV, SDK_ENDPOINT_ENV):
        value = os.environ.get(var, "").strip()
        if value:
            return value.rstrip("/")
    if os.environ.get(SDK_ENDPOINT_MODE_ENV, "").strip().lower() == "ipv6":
        return DEFAULT_ENDPOINT_IPV6
    return DEFAULT_ENDPOINT


class ImdsClient:
    """IMDSv2 client: one short-lived connection per request, token fetched lazily and cached.

    Not thread-safe; the watcher polls from one thread. `timeout` bounds each connect and each
    read, so a request that gets no answer costs at most about `timeout` (twice on a token
    refresh).
    """

    def __init__(
        self, endpoint: str | None = None, timeout: float = 1.0, token_ttl: int = MAX_TOKEN_TTL
    ) -> None:
        if not 1 <= token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_ttl must be 1..{MAX_TOKEN_TTL} seconds, not {token_ttl}")
        self.endpoint = resolve_endpoint(endpoint)
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"IMDS endpoint must be an http:// or https:// URL, not {self.endpoint!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.token_ttl = token_ttl
        self._token: str | None = None
        self._token_refresh_at = 0.0  # time.monotonic() after which the token is renewed

    # -- public API -----------------------------------------------------------------------

    def spot_notice(self) -> Notice | None:
        """The Spot interruption notice, or None while there is none (IMDS answers 404)."""
        data = self._get_json(SPOT_PATH)
        if data is None:
            return None
        action, when = data.get("action"), data.get("time")
        if not isinstance(action, str) or not isinstance(when, str):
            raise ImdsUnavailable(f"GET {SPOT_PATH}: expected string 'action' and 'time', got {data!r:.200}")
        return Notice(kind="spot", action=action, time=when)

    def rebalance(self) -> Notice | None:
        """The rebalance recommendation, or None while there is none (IMDS answers 404)."""
        data = self._get_json(REBALANCE_PATH)
        if data is None:
            return None
        when = data.get("noticeTime")
        if not isinstance(when, str):
            raise ImdsUnavailable(f"GET {REBALANCE_PATH}: expected string 'noticeTime', got {data!r:.200}")
        return Notice(kind="rebalance", action=None, time=when)

    def instance_info(self) -> dict[str, str]:
        """instance-id, instance-type, availability-zone, instance-life-cycle, for checkpoint metadata.

        Best effort, never raises: keys IMDS lacks are omitted, and the first unavailability
        ends the walk (so a hung IMDS costs one timeout, not one per key).
        """
        info: dict[str, str] = {}
        for key, path in INSTANCE_INFO_PATHS.items():
            try:
                body = self._get(path)
            except ImdsUnavailable:
                break
            if body is None:
                continue
            value = body.decode("utf-8", "replace").strip()
            if value:
                info[key] = value
        return info

    # -- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """One HTTP exchange on a fresh connection; network and protocol errors become ImdsUnavailable."""
        conn_cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = conn_cls(self._host, self._port, timeout=self.timeout)
        try:
            conn.request(method, self._prefix + path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(MAX_BODY)
        except (OSError, http.client.HTTPException) as e:
            reason = str(e) or type(e).__name__
            raise ImdsUnavailable(f"{method} {self.endpoint}{path}: {reason}") from e
        finally:
            conn.close()

    def _get_token(self) -> str:
        """The cached session token, fetched anew when absent or near the end of its TTL."""
        now = time.monotonic()
        if self._token is not None and now < self._token_refresh_at:
            return self._token
        self._token = None
        status, body = self._request("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(self.token_ttl)})
        token = body.decode("ascii", "replace").strip()
        if status != 200 or not token:
            raise ImdsUnavailable(f"PUT {self.endpoint}{TOKEN_PATH}: HTTP {status}, no token", status)
        margin = min(TOKEN_REFRESH_MARGIN, self.token_ttl / 10)
        self._token, self._token_refresh_at = token, now + self.token_ttl - margin
        return token

    def _get(self, path: str) -> bytes | None:
        """GET with the token; None on 404. On 401 the token is renewed and the GET retried once."""
        for attempt in range(2):
            status, body = self._request("GET", path, {TOKEN_HEADER: self._get_token()})
            if status == 200:
                return body
            if status == 404:
                return None
            if status == 401 and attempt == 0:
                self._token = None  # expired or revoked early: fetch a new one and retry
                continue
            break
        detail = " (token rejected after renewal)" if status == 401 else ""
        raise ImdsUnavailable(f"GET {self.endpoint}{path}: HTTP {status}{detail}", status)

    def _get_json(self, path: str) -> dict | None:
        body = self._get(path)
        if body is None:
            return None
        try:
            data = json.loads(body)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
            raise ImdsUnavailable(
                f"GET {self.endpoint}{path}: body is not valid JSON ({e}): {body[:200]!r}"
            ) from e
        if not isinstance(data, dict):
            raise ImdsUnavailable(f"GET {self.endpoint}{path}: expected a JSON object, got {body[:200]!r}")
        return data


class Backoff:
    """Exponential backoff with jitter and a cap, for polling IMDS while it is unavailable.

    Call `next_delay()` after each failure and sleep that long; call `reset()` after a success.
    The jitter takes up to `jitter` (a fraction) off each delay, so that many watchers on one
    host don't retry in lock-step; the lower bound still grows, so the backoff always backs off.
    """

    def __init__(
        self,
        base: float = 1.0,
        cap: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or cap < base or factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("need 0 < base <= cap, factor >= 1, 0 <= jitter <= 1")
        self.base, self.cap, self.factor, self.jitter = base, cap, factor, jitter
        self._rng = rng or random.Random()
        self._step = 0  # failures counted, up to the first capped delay

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        delay = min(self.cap, self.base * self.factor**self._step)
        if delay < self.cap:  # stop counting once capped, so factor**step never overflows
            self._step += 1
        return delay * (1 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """Back to `base` after a success."""
        self._step = 0

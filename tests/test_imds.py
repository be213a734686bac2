"""The IMDSv2 client against the emulator, the emulator itself, its CLI, and Backoff.

Everything talks to 127.0.0.1 only; the one test of the default endpoint builds a client and
sends nothing.
"""

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mmshim.imds import (
    DEFAULT_ENDPOINT,
    Backoff,
    ImdsClient,
    ImdsUnavailable,
    Notice,
    resolve_endpoint,
)
from mmshim.imds_emulator import Emulator

REPO = Path(__file__).resolve().parents[1]
ENDPOINT_VARS = (
    "MMSHIM_IMDS_ENDPOINT",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
)


@pytest.fixture(autouse=True)
def _no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No inherited variable may point a client anywhere but where a test says."""
    for var in ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def emu():
    e = Emulator("127.0.0.1", 0, hang_seconds=10).start()
    yield e
    e.stop()


def make_client(endpoint: str, **kw) -> ImdsClient:
    assert endpoint.startswith("http://127.0.0.1:")
    return ImdsClient(endpoint, **kw)


@pytest.fixture
def client(emu: Emulator) -> ImdsClient:
    return make_client(emu.endpoint, timeout=1.0)


def raw(emu: Emulator, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ENDPOINT_VARS}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "mmshim.imds_emulator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def seconds_from_now(stamp: str) -> float:
    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


# -- notices ------------------------------------------------------------------------------


def test_no_notice_is_none(client: ImdsClient) -> None:
    assert client.spot_notice() is None
    assert client.rebalance() is None


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_spot_notice_after_trigger(emu: Emulator, client: ImdsClient, action: str) -> None:
    emu.trigger_spot(action)
    notice = client.spot_notice()
    assert isinstance(notice, Notice)
    assert (notice.kind, notice.action) == ("spot", action)
    assert 110 <= seconds_from_now(notice.time) <= 121  # about two minutes ahead
    assert client.rebalance() is None


def test_spot_notice_body_is_the_documented_json(emu: Emulator, client: ImdsClient) -> None:
    emu.trigger_spot()
    client.spot_notice()  # to have a token
    status, body = raw(
        emu, "GET", "/latest/meta-data/spot/instance-action", {"X-aws-ec2-metadata-token": client._token}
    )
    assert status == 200
    assert set(json.loads(body)) == {"action", "time"}


def test_rebalance_after_trigger(emu: Emulator, client: ImdsClient) -> None:
    emu.trigger_rebalance()
    notice = client.rebalance()
    assert notice is not None
    assert (notice.kind, notice.action) == ("rebalance", None)
    assert -5 <= seconds_from_now(notice.time) <= 1
    assert client.spot_notice() is None


def test_reset_withdraws_notices(emu: Emulator, client: ImdsClient) -> None:
    emu.trigger_spot()
    emu.trigger_rebalance()
    assert client.spot_notice() is not None
    emu.reset()
    assert client.spot_notice() is None
    assert client.rebalance() is None


def test_http_triggers_and_their_validation(emu: Emulator, client: ImdsClient) -> None:
    assert raw(emu, "POST", "/mmshim/spot?action=explode")[0] == 400
    assert raw(emu, "POST", "/mmshim/fault?mode=nope")[0] == 400
    assert raw(emu, "POST", "/mmshim/fault?mode=500&count=0")[0] == 400
    assert client.spot_notice() is None
    assert raw(emu, "POST", "/mmshim/spot?action=stop")[0] == 200
    assert raw(emu, "POST", "/mmshim/rebalance")[0] == 200
    assert client.spot_notice().action == "stop"
    assert client.rebalance() is not None
    assert raw(emu, "POST", "/mmshim/reset")[0] == 200
    assert client.spot_notice() is None


# -- tokens -------------------------------------------------------------------------------


def test_token_required(emu: Emulator) -> None:
    path = "/latest/meta-data/instance-id"
    assert raw(emu, "GET", path)[0] == 401
    assert raw(emu, "GET", path, {"X-aws-ec2-metadata-token": "forged"})[0] == 401
    assert raw(emu, "PUT", "/latest/api/token")[0] == 400  # TTL header required
    for bad in ("0", "21601", "soon"):
        assert raw(emu, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": bad})[0] == 400
    status, token = raw(emu, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200 and token
    assert raw(emu, "GET", path, {"X-aws-ec2-metadata-token": token}) == (200, "i-0123456789abcdef0")


def test_imdsv1_switch() -> None:
    with Emulator(allow_v1=True) as e:
        assert raw(e, "GET", "/latest/meta-data/instance-id")[0] == 200
        # A token that is present but invalid is refused even with IMDSv1 allowed, as on EC2.
        assert raw(e, "GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": "x"})[0] == 401


def test_emulator_expires_tokens(emu: Emulator) -> None:
    _, token = raw(emu, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "1"})
    headers = {"X-aws-ec2-metadata-token": token}
    assert raw(emu, "GET", "/latest/meta-data/instance-id", headers)[0] == 200
    time.sleep(1.1)
    assert raw(emu, "GET", "/latest/meta-data/instance-id", headers)[0] == 401


def test_token_is_cached(emu: Emulator, client: ImdsClient) -> None:
    for _ in range(3):
        client.spot_notice()
    client.instance_info()
    assert emu.stats()["tokens_issued"] == 1


def test_token_refreshed_before_its_ttl_ends(emu: Emulator) -> None:
    c = make_client(emu.endpoint, token_ttl=1)
    assert c.spot_notice() is None
    time.sleep(1.0)
    assert c.spot_notice() is None
    stats = emu.stats()
    assert stats["tokens_issued"] == 2
    assert stats["unauthorized"] == 0  # renewed ahead of expiry, not after a 401


def test_401_renews_token_and_retries_once(emu: Emulator, client: ImdsClient) -> None:
    assert client.spot_notice() is None
    emu.fault("expire-tokens", 1)
    emu.trigger_spot()
    assert client.spot_notice().action == "terminate"
    stats = emu.stats()
    assert (stats["tokens_issued"], stats["unauthorized"]) == (2, 1)


def test_401_twice_is_unavailable_then_recovers(emu: Emulator, client: ImdsClient) -> None:
    emu.fault("expire-tokens", 2)
    with pytest.raises(ImdsUnavailable, match="401") as err:
        client.spot_notice()
    assert err.value.status == 401
    assert client.spot_notice() is None


def test_token_ttl_validated() -> None:
    with pytest.raises(ValueError):
        ImdsClient("http://127.0.0.1:9", token_ttl=0)
    with pytest.raises(ValueError):
        ImdsClient("http://127.0.0.1:9", token_ttl=21601)


# -- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["on-token-put", "on-get"])
def test_500_is_unavailable_then_recovers(emu: Emulator, warm: bool) -> None:
    c = make_client(emu.endpoint)
    if warm:
        c.spot_notice()
    emu.fault("500", 2)
    for _ in range(2):
        with pytest.raises(ImdsUnavailable) as err:
            c.spot_notice()
        assert err.value.status == 500
    emu.trigger_spot()
    assert c.spot_notice().action == "terminate"


@pytest.mark.parametrize("warm", [False, True], ids=["on-token-put", "on-get"])
def test_hang_times_out_fast_then_recovers(emu: Emulator, warm: bool) -> None:
    c = make_client(emu.endpoint, timeout=0.3)
    if warm:
        c.spot_notice()
    emu.fault("hang", 1)
    with pytest.raises(ImdsUnavailable, match="timed out") as err:  # the client's timeout, not the hang
        c.spot_notice()
    assert err.value.status is None
    assert c.spot_notice() is None


@pytest.mark.parametrize("method", ["spot_notice", "rebalance"])
def test_bad_json_is_unavailable_then_recovers(emu: Emulator, client: ImdsClient, method: str) -> None:
    emu.fault("badjson", 1)
    with pytest.raises(ImdsUnavailable, match="not valid JSON"):
        getattr(client, method)()
    assert getattr(client, method)() is None


def test_json_of_the_wrong_shape_is_unavailable(client: ImdsClient, monkeypatch: pytest.MonkeyPatch) -> None:
    for body in (b'["terminate"]', b'{"action": "terminate"}', b'{"action": 1, "time": "x"}'):
        monkeypatch.setattr(client, "_get", lambda path, body=body: body)
        with pytest.raises(ImdsUnavailable):
            client.spot_notice()
    monkeypatch.setattr(client, "_get", lambda path: b"{}")
    with pytest.raises(ImdsUnavailable, match="noticeTime"):
        client.rebalance()


def test_connection_refused_is_unavailable_fast() -> None:
    c = make_client(f"http://127.0.0.1:{free_port()}", timeout=5.0)
    with pytest.raises(ImdsUnavailable, match="refused"):  # refused at once, not a timeout
        c.spot_notice()
    assert c.instance_info() == {}


def test_proxy_variables_are_ignored(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert make_client(emu.endpoint).spot_notice() is None


# -- instance info ------------------------------------------------------------------------


def test_instance_info(emu: Emulator, client: ImdsClient) -> None:
    assert client.instance_info() == {
        "instance-id": "i-0123456789abcdef0",
        "instance-type": "m5.large",
        "availability-zone": "us-east-1a",
        "instance-life-cycle": "spot",
    }


def test_instance_info_configured_and_missing_keys_omitted() -> None:
    meta = {
        "instance-type": "c5.xlarge",
        "placement/availability-zone": "eu-west-1b",
        "instance-life-cycle": None,
    }
    with Emulator(metadata=meta) as e:
        assert make_client(e.endpoint).instance_info() == {
            "instance-id": "i-0123456789abcdef0",
            "instance-type": "c5.xlarge",
            "availability-zone": "eu-west-1b",
        }


def test_instance_info_never_raises_nor_blocks(emu: Emulator) -> None:
    c = make_client(emu.endpoint, timeout=0.3)
    emu.fault("hang", 10)
    assert c.instance_info() == {}
    assert emu.stats()["fault"]["count"] == 9  # one request timed out, then it stopped asking
    emu.reset()
    emu.fault("500", 10)
    assert c.instance_info() == {}


def test_metadata_directory_listing(emu: Emulator, client: ImdsClient) -> None:
    emu.trigger_spot()
    client.spot_notice()  # to have a token
    headers = {"X-aws-ec2-metadata-token": client._token}
    status, body = raw(emu, "GET", "/latest/meta-data/", headers)
    assert status == 200
    assert {"instance-id", "placement/", "spot/"} <= set(body.split("\n"))
    assert raw(emu, "GET", "/latest/meta-data/placement", headers) == (200, "availability-zone\nregion")


# -- endpoint -----------------------------------------------------------------------------


def test_endpoint_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    # Construction only: nothing is sent to the real endpoint.
    assert ImdsClient().endpoint == DEFAULT_ENDPOINT == "http://169.254.169.254"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
    assert resolve_endpoint() == "http://[fd00:ec2::254]"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:1/")
    assert resolve_endpoint() == "http://127.0.0.1:1"
    monkeypatch.setenv("MMSHIM_IMDS_ENDPOINT", "http://127.0.0.1:2")
    assert ImdsClient().endpoint == "http://127.0.0.1:2"
    assert ImdsClient("http://127.0.0.1:3").endpoint == "http://127.0.0.1:3"
    with pytest.raises(ValueError):
        ImdsClient("ftp://127.0.0.1")


def test_endpoint_from_env_is_used(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSHIM_IMDS_ENDPOINT", emu.endpoint)
    emu.trigger_rebalance()
    assert ImdsClient().rebalance() is not None


# -- CLI ----------------------------------------------------------------------------------


def test_cli_triggers(emu: Emulator, client: ImdsClient) -> None:
    res = run_cli("spot", "--action", "hibernate", "--endpoint", emu.endpoint)
    assert res.returncode == 0, res.stderr
    assert client.spot_notice().action == "hibernate"
    assert run_cli("rebalance", "--endpoint", emu.endpoint).returncode == 0
    assert client.rebalance() is not None
    assert run_cli("fault", "--mode", "500", "--count", "1", "--endpoint", emu.endpoint).returncode == 0
    with pytest.raises(ImdsUnavailable):
        client.spot_notice()
    assert run_cli("reset", "--endpoint", emu.endpoint).returncode == 0
    assert client.spot_notice() is None
    assert client.rebalance() is None


def test_cli_unreachable_emulator_fails() -> None:
    res = run_cli("spot", "--endpoint", f"http://127.0.0.1:{free_port()}")
    assert res.returncode != 0
    assert "cannot reach" in res.stderr


def test_cli_serve(tmp_path: Path) -> None:
    pid_file = tmp_path / "imds.pid"
    env = {k: v for k, v in os.environ.items() if k not in ENDPOINT_VARS}
    env["PYTHONPATH"] = str(REPO)
    argv = [sys.executable, "-m", "mmshim.imds_emulator", "serve", "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(
        [*argv, "--pid-file", str(pid_file), "--metadata", "instance-type=r6i.large"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists():
            assert proc.poll() is None, "emulator exited early"
            assert time.monotonic() < deadline, "no pid file"
            time.sleep(0.05)
        assert int(pid_file.read_text()) == proc.pid
        line = proc.stdout.readline()
        endpoint = line.rsplit(" ", 1)[-1].strip()
        c = make_client(endpoint)
        assert c.instance_info()["instance-type"] == "r6i.large"
        assert run_cli("spot", "--endpoint", endpoint).returncode == 0
        assert c.spot_notice().action == "terminate"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- backoff ------------------------------------------------------------------------------


def test_backoff_grows_caps_and_resets() -> None:
    b = Backoff(base=1, cap=10, factor=2, jitter=0)
    assert [b.next_delay() for _ in range(6)] == [1, 2, 4, 8, 10, 10]
    b.reset()
    assert b.next_delay() == 1


def test_backoff_never_overflows() -> None:
    b = Backoff(base=0.5, cap=30, jitter=0)
    delays = [b.next_delay() for _ in range(5000)]  # 2.0**5000 would raise OverflowError
    assert delays[:3] == [0.5, 1, 2]
    assert max(delays) == delays[-1] == 30


def test_backoff_jitter_stays_in_bounds() -> None:
    b = Backoff(base=1, cap=16, factor=2, jitter=0.5, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(8)]
    for got, full in zip(delays, [1, 2, 4, 8, 16, 16, 16, 16], strict=True):
        assert full * 0.5 <= got <= full
    assert len(set(delays)) == len(delays)  # jittered, not constant


def test_backoff_validates() -> None:
    for kw in ({"base": 0}, {"base": 5, "cap": 1}, {"factor": 0.5}, {"jitter": 1.5}):
        with pytest.raises(ValueError):
            Backoff(**kw)

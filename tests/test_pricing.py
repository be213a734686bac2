"""The price table: loading it, and refreshing it from AWS (EC2 Spot prices from moto's server on
127.0.0.1; the Pricing API, which moto does not serve, through botocore's Stubber)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber

from mmshim import pricing
from tests.test_cli import mmshimctl


def product(itype: str, usd: str, vcpu: str) -> str:
    """One PriceList entry as the Pricing API returns it: a JSON string."""
    return json.dumps(
        {
            "product": {"attributes": {"instanceType": itype, "vcpu": vcpu, "operatingSystem": "Linux"}},
            "terms": {
                "OnDemand": {
                    "X.JRTCKXETXF": {
                        "priceDimensions": {
                            "X.JRTCKXETXF.6YS6EN2CT7": {"unit": "Hrs", "pricePerUnit": {"USD": usd}}
                        }
                    }
                }
            },
        }
    )


@pytest.fixture
def pricing_endpoint() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A Pricing API (JSON 1.1 GetProducts) on 127.0.0.1 knowing m5.large only; yields its URL and
    the requests it got."""
    seen: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"target": self.headers["X-Amz-Target"], **body})
            itype = {f["Field"]: f["Value"] for f in body["Filters"]}["instanceType"]
            listed = [product("m5.large", "0.0960000000", "2")] if itype == "m5.large" else []
            out = json.dumps({"PriceList": listed, "FormatVersion": "aws_v1"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", seen
    finally:
        httpd.shutdown()
        thread.join(10)


@pytest.fixture
def ec2(s3_server: str) -> Any:
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=s3_server)


def stubbed_pricing(answers: dict[str, list[str]]) -> tuple[Any, Stubber]:
    client = boto3.client("pricing", region_name="us-east-1")
    stub = Stubber(client)
    for _itype, price_list in answers.items():
        stub.add_response(
            "get_products",
            {"PriceList": price_list, "FormatVersion": "aws_v1"},
            {"ServiceCode": "AmazonEC2", "Filters": ANY, "MaxResults": 10},
        )
    stub.activate()
    return client, stub


def test_shipped_table_loads_and_bad_tables_are_refused(tmp_path: Path) -> None:
    p = pricing.load_prices()
    assert p["date"] and p["region"] == "us-east-1"
    for t in ("m5.xlarge", "c5.2xlarge", "r5.2xlarge", "m6i.2xlarge", "c6i.4xlarge"):
        assert 0 < p["instances"][t]["spot"] < p["instances"][t]["on_demand"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"instances": {"x": {"spot": "cheap"}}}')
    with pytest.raises(ValueError, match="numeric"):
        pricing.load_prices(bad)
    with pytest.raises(ValueError, match="cannot read"):
        pricing.load_prices(tmp_path / "missing.json")


def test_rates_charge_the_jobs_share_of_the_instance() -> None:
    table = {"instances": {"m5.xlarge": {"vcpus": 4, "on_demand": 0.2, "spot": 0.08}}}
    assert pricing.rates(table, "m5.xlarge", "spot", 2) == pytest.approx((0.04, 0.1))
    assert pricing.rates(table, "m5.xlarge", "on-demand", None) == pytest.approx((0.2, 0.2))
    assert pricing.rates(table, "x9.huge", "spot", 2) is None


def test_refresh_prices_listed_types_and_keeps_the_rest(ec2: Any) -> None:
    zones = ec2.describe_spot_price_history(InstanceTypes=["m5.large"])["SpotPriceHistory"]
    assert zones, "moto serves Spot prices per Availability Zone"
    client, stub = stubbed_pricing({"m5.large": [product("m5.large", "0.0960000000", "2")], "z9.none": []})
    table = {
        "date": "2020-01-01",
        "region": "us-east-1",
        "instances": {
            "m5.large": {"vcpus": 2, "on_demand": 1.0, "spot": 1.0},
            "z9.none": {"vcpus": 1, "on_demand": 0.5, "spot": 0.2},
        },
        "path": "/somewhere",
    }
    out, problems = pricing.refresh(table, "us-east-1", ["m5.large", "z9.none"], client, ec2)
    stub.assert_no_pending_responses()
    assert out["instances"]["m5.large"] == {"vcpus": 2, "on_demand": 0.096, "spot": pytest.approx(0.00001)}
    assert out["instances"]["z9.none"] == table["instances"]["z9.none"]  # kept, and said so
    assert problems == ["z9.none: no on-demand price in us-east-1"]
    assert "z9.none" in out["note"] and out["date"] != "2020-01-01" and "path" not in out
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(out, f)
        f.flush()
        assert pricing.load_prices(f.name)["instances"]["m5.large"]["on_demand"] == 0.096


def test_cli_shows_the_table_and_refresh_failures_are_clear(s3_server: str, tmp_path: Path) -> None:
    shown = subprocess.run([*mmshimctl(), "--json", "prices"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["instances"]["m5.large"]["on_demand"] > 0

    refused = subprocess.run(
        [*mmshimctl(), "prices", "--refresh"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "--out FILE" in refused.stderr

    # The Pricing API is unreachable (pointed at a closed port on loopback): a clear error, no file.
    out = tmp_path / "prices.json"
    env = {**os.environ, "AWS_ENDPOINT_URL_PRICING": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    failed = subprocess.run(
        [*mmshimctl(), "prices", "--refresh", "--type", "m5.large", "--out", str(out),
         "--ec2-endpoint-url", s3_server],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert failed.returncode == 2, failed.stderr
    assert "cannot refresh prices from AWS" in failed.stderr and not out.exists()


def test_cli_refresh_writes_a_table_the_viewer_loads(
    s3_server: str, pricing_endpoint: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The whole command: Pricing API and EC2 on loopback, the table written, a gap reported."""
    url, seen = pricing_endpoint
    out = tmp_path / "prices.json"
    env = {**os.environ, "AWS_ENDPOINT_URL_PRICING": url}
    done = subprocess.run(
        [*mmshimctl(), "--json", "prices", "--refresh", "--type", "m5.large", "--type", "z9.none",
         "--out", str(out), "--ec2-endpoint-url", s3_server],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "warning: z9.none: no on-demand price in us-east-1" in done.stderr
    assert [r["target"] for r in seen] == ["AWSPriceListService.GetProducts"] * 2
    table = pricing.load_prices(out)
    assert table["instances"]["m5.large"]["on_demand"] == 0.096
    assert table["instances"]["m5.large"]["spot"] == pytest.approx(0.00001)
    assert table["instances"]["c5.xlarge"] == pricing.load_prices()["instances"]["c5.xlarge"]  # kept
    assert json.loads(done.stdout)["problems"] == ["z9.none: no on-demand price in us-east-1"]

"""The price table: loading it, and refreshing it from AWS (EC2 Spot prices from moto's server on
127.0.0.1; the Pricing API, which moto does not serve, through botocore's Stubber)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
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

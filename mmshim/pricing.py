"""The price table the viewer costs jobs with: loading it, and refreshing it from AWS (on-demand
list prices from the Pricing API, the current Spot price from EC2's Spot price history).

Only an operator's `mmshimctl prices --refresh` calls AWS; the viewer never does (it must work
offline, after the hosts are gone). A type AWS gives no price for keeps its old entry and is
reported, so a partial answer never empties the table.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
from pathlib import Path
from typing import Any

DEFAULT_PRICES = Path(__file__).with_name("prices.json")
PRICES_ENV = "MMSHIM_VIEWER_PRICES"
PRICING_REGION = "us-east-1"  # the Pricing API answers from a few regions only, for all of them
LINUX_SPOT = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")


def load_prices(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The price table: `path`, else $MMSHIM_VIEWER_PRICES, else the shipped mmshim/prices.json.

    {"date", "region", "currency", "note", "instances": {type: {"vcpus", "on_demand", "spot"}}};
    ValueError with the reason if it is not usable.
    """
    src = Path(path or os.environ.get(PRICES_ENV) or DEFAULT_PRICES)
    try:
        doc = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read price table {src}: {e}") from e
    instances = doc.get("instances") if isinstance(doc, dict) else None
    if not isinstance(instances, dict):
        raise ValueError(f"price table {src} has no 'instances' object")
    for name, p in instances.items():
        if not isinstance(p, dict) or not all(
            isinstance(p.get(k), int | float) and p[k] >= 0 for k in ("on_demand", "spot")
        ):
            raise ValueError(f"price table {src}: {name} needs numeric 'on_demand' and 'spot'")
    return {**doc, "path": str(src)}


def rates(prices: dict[str, Any], itype: str | None, lifecycle: str | None, vcpus: float | None):
    """(rate actually paid, on-demand rate), both $/h scaled by the job's share of the instance."""
    p = prices["instances"].get(itype or "")
    if p is None:
        return None
    share = 1.0
    if vcpus and isinstance(p.get("vcpus"), int | float) and p["vcpus"] > 0:
        share = min(1.0, float(vcpus) / float(p["vcpus"]))
    od = float(p["on_demand"]) * share
    paid = float(p["spot"]) * share if lifecycle == "spot" else od
    return paid, od


def on_demand(pricing: Any, region: str, itype: str) -> tuple[float, int | None] | None:
    """(USD per hour, vCPUs) of Linux, shared tenancy, no pre-installed software; None if unlisted."""
    filters = {
        "instanceType": itype,
        "regionCode": region,
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
    }
    resp = pricing.get_products(
        ServiceCode="AmazonEC2",
        Filters=[{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in filters.items()],
        MaxResults=10,
    )
    for raw in resp.get("PriceList", []):
        product = json.loads(raw) if isinstance(raw, str) else raw
        for term in product.get("terms", {}).get("OnDemand", {}).values():
            for dim in term.get("priceDimensions", {}).values():
                usd = float(dim.get("pricePerUnit", {}).get("USD", 0) or 0)
                if usd > 0:
                    vcpu = product.get("product", {}).get("attributes", {}).get("vcpu")
                    return usd, int(vcpu) if str(vcpu).isdigit() else None
    return None


def spot(ec2: Any, itype: str) -> float | None:
    """The median over Availability Zones of each zone's latest Linux Spot price; None if none."""
    resp = ec2.describe_spot_price_history(
        InstanceTypes=[itype],
        ProductDescriptions=list(LINUX_SPOT),
        StartTime=datetime.datetime.now(datetime.UTC),
    )
    latest: dict[str, tuple[Any, float]] = {}
    for h in resp.get("SpotPriceHistory", []):
        zone, when, price = h.get("AvailabilityZone"), h.get("Timestamp"), float(h.get("SpotPrice") or 0)
        if price > 0 and (zone not in latest or when > latest[zone][0]):
            latest[zone] = (when, price)
    return statistics.median(p for _, p in latest.values()) if latest else None


def refresh(
    table: dict[str, Any], region: str, types: list[str], pricing: Any, ec2: Any
) -> tuple[dict[str, Any], list[str]]:
    """A new table with `types` priced afresh (others kept), and what could not be priced, why."""
    instances = dict(table.get("instances", {}))
    problems = []
    for itype in types:
        od, sp = on_demand(pricing, region, itype), spot(ec2, itype)
        if od is None or sp is None:
            problems.append(f"{itype}: no {'on-demand' if od is None else 'Spot'} price in {region}")
            continue
        entry = dict(instances.get(itype, {}))
        entry.update(on_demand=od[0], spot=sp)
        if od[1]:
            entry["vcpus"] = od[1]
        instances[itype] = entry
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    note = (
        f"Linux prices per instance-hour in {region}, refreshed on {today} by mmshimctl prices "
        "--refresh: on-demand list prices from the AWS Pricing API, Spot as the median over "
        "Availability Zones of the latest Spot price (Spot changes hourly). Estimates, not a quote."
    )
    if problems:
        note += f" Not refreshed (older prices kept): {'; '.join(problems)}."
    out = {**table, "date": today, "region": region, "currency": "USD", "note": note, "instances": instances}
    out.pop("path", None)
    return out, problems


def clients(region: str, profile: str | None = None, endpoint_url: str | None = None) -> tuple[Any, Any]:
    """(pricing, ec2) boto3 clients; endpoint_url (tests, private endpoints) applies to EC2."""
    import boto3

    session = boto3.Session(profile_name=profile)
    return (
        session.client("pricing", region_name=PRICING_REGION),
        session.client("ec2", region_name=region, endpoint_url=endpoint_url),
    )

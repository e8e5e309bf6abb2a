"""The Grafana dashboard only plots metrics the gateway really exports, and sums system series
(exported by one gateway replica) without selecting quantities by label."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from shared.settings import Settings
from tests.gateway.test_metrics import _populate, families

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "asyncinfer.json"


async def test_dashboard_queries_name_exported_metrics(client: httpx.AsyncClient,
                                                       settings: Settings) -> None:
    await _populate(settings)
    await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}})
    exported = families((await client.get("/metrics")).text)
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            assert "value=" not in expr  # one metric per quantity: nothing to select
            used |= set(re.findall(r"asyncinfer_[a-z_]+", expr))
    assert len(used) >= 15
    for name in used:
        base = re.sub(r"_bucket$", "", name)
        assert base in exported, f"{name} is not exported"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))

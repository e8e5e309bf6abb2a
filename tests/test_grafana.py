"""The Grafana dashboard only plots metrics the gateway really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "asyncinfer.json"


async def test_dashboard_queries_name_exported_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}})
    text = (await client.get("/metrics")).text
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    dash = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"asyncinfer_[a-z_]+", target["expr"]))
    assert used
    for name in used:
        base = re.sub(r"_(bucket|total|count|sum)$", "", name)
        assert name in families or base in families, f"{name} is not exported"

"""The GPU tests' probe model, run on the CPU here so that it is known to work before it
reaches a GPU machine."""

from __future__ import annotations

import pytest

from tests.workers.gpu_models import Probe, ProbeInput


def test_probe_reports_where_its_tensors_live() -> None:
    pytest.importorskip("torch")
    model = Probe(matmuls=3, size=16)
    model.load("cpu")
    out = model.predict([ProbeInput(x=2.0), ProbeInput(x=-1.5)])
    assert [(o.y, o.device, o.uuid) for o in out] == [(2.0, "cpu", ""), (-1.5, "cpu", "")]

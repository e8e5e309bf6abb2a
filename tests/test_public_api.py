"""The public API is `asyncinfer`: what model authors and callers import, and nothing heavier
than they use. Docs, examples and the built-in models use only it (never the internal `shared`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import asyncinfer
from shared.modelspec import load_specs

ROOT = Path(__file__).parent.parent
# What a model author or a caller imports; each name is the implementation, not a copy.
PUBLIC = ("InferenceModel", "ServingOptions", "ModelContext", "FAULT_HOOK", "worker_context",
          "Client", "AsyncClient", "ApiError", "ModelInfo", "SubmitOptions", "Job")
INTERNAL_IMPORT = re.compile(r"^\s*(from|import)\s+(shared|workers\.context|asyncinfer\.client)\b",
                             re.M)


def test_public_names_are_the_implementation() -> None:
    from asyncinfer import AsyncClient, Client, InferenceModel, ServingOptions, worker_context
    from asyncinfer.client import AsyncClient as AC
    from asyncinfer.client import Client as C
    from shared.model import InferenceModel as IM
    from shared.model import ServingOptions as SO
    from workers.context import current

    assert (InferenceModel, ServingOptions, Client, AsyncClient) == (IM, SO, C, AC)
    assert worker_context is current
    assert set(PUBLIC) <= set(asyncinfer.__all__)
    for name in PUBLIC:
        assert getattr(asyncinfer, name) is not None
    with pytest.raises(AttributeError):
        asyncinfer.NoSuchThing  # noqa: B018


def test_import_asyncinfer_is_light() -> None:
    # The gateway and batcher load model classes that import asyncinfer: it must pull in
    # neither torch nor the HTTP client, and a model's imports only the model interface.
    code = ("import sys, asyncinfer; from asyncinfer import InferenceModel, ServingOptions; "
            "print(' '.join(sorted(m for m in ('torch', 'httpx', 'fastapi', 'celery', 'redis') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == ""


def test_gateway_and_batcher_never_import_torch() -> None:
    code = ("import sys, gateway.app, batcher.service; from shared.modelspec import load_specs; "
            "[s.cls for s in load_specs(None).values()]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == "False"


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def test_docs_examples_and_builtin_models_import_only_the_public_api() -> None:
    sources: dict[str, str] = {}
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(_python_blocks(md.read_text())):
            sources[f"{md.name}#{i}"] = block
    for py in [*sorted((ROOT / "workers" / "builtin").glob("*.py")),
               *sorted((ROOT / "examples").glob("*.py"))]:
        sources[str(py.relative_to(ROOT))] = py.read_text()
    assert any("from asyncinfer import" in s for s in sources.values())
    offenders = {where: m.group(0).strip() for where, src in sources.items()
                 for m in INTERNAL_IMPORT.finditer(src)}
    assert offenders == {}


def test_example_model_serves_from_its_models_file() -> None:
    specs = load_specs(ROOT / "examples" / "models.toml")
    upper = specs["upper"].cls
    assert upper.__mro__[1] is asyncinfer.InferenceModel
    model = upper()
    assert model.predict(["ab", "c"]) == ["AB", "C"]

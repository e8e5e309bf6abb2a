"""Writing benchmark results into the docs and out of the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Where every benchmark reads and writes: the repository, its raw results (not committed), the
# docs the results are written into and their pictures.
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs"
IMG = DOCS / "img"


def replace_section(doc: Path, begin: str, end: str, section: str) -> bool:
    """Replace what stands between the `begin` and `end` markers of `doc`; False when the doc
    or its markers are missing (the caller then says where the results went instead)."""
    if not doc.exists():
        return False
    text = doc.read_text()
    if begin not in text or end not in text:
        return False
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{begin}\n{section}\n{end}{tail}")
    return True


def emit_json(result: Any, out: Path | None) -> None:
    """Write `result` as JSON to `out`, or print it when no file is named."""
    text = json.dumps(result, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    else:
        print(text)

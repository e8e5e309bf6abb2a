"""The `asyncinfer` command line against a real gateway, batcher and worker (processes), and its
exit codes through the installed console script."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from asyncinfer.cli import main
from shared.procs import free_port
from shared.settings import Settings
from tests.conftest import Procs


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_commands_against_the_real_system(procs: Procs, settings: Settings, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url = procs.serving()

    code, out, _ = run(capsys, "models", "--url", url)
    assert code == 0 and "synthetic" in [m["name"] for m in json.loads(out)]

    source = tmp_path / "input.json"
    source.write_text('{"x": 21}')
    code, out, _ = run(capsys, "submit", "synthetic", str(source), "--wait", "30", "--url", url)
    job = json.loads(out)
    assert code == 0 and job["status"] == "succeeded" and job["output"] == {"y": 42.0}

    monkeypatch.setenv("ASYNCINFER_URL", url)  # from here on the URL comes from the environment
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"x": 4}'))
    code, out, _ = run(capsys, "submit", "synthetic", "-", "--priority", "low")
    job_id = json.loads(out)["id"]
    code, out, _ = run(capsys, "get", job_id, "--wait", "30")
    assert code == 0 and json.loads(out)["output"] == {"y": 8.0}

    code, out, err = run(capsys, "cancel", job_id)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "409 conflict" in err

    png = tmp_path / "bench.png"
    code, out, err = run(capsys, "bench", "synthetic", "--rate", "40", "--duration", "1",
                         "--arrivals", "fixed", "--plot", str(png))
    summary = json.loads(out)
    assert code == 0 and summary["arrived"] == 40 and summary["status_counts"] == {"succeeded": 40}
    assert summary["latency_ms"]["p50"] > 0 and "[bench synthetic] [#" in err  # the bar
    assert "jobs/s" in err and "p99" in err
    assert "latency p99" in err and "  succeeded  40" in err  # the closing table
    assert png.read_bytes()[:4] == b"\x89PNG" and summary["plot"] == str(png)


def test_console_script_prints_one_line_and_exits_1_or_2(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "asyncinfer"
    dead = f"http://127.0.0.1:{free_port()}"

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=60,
                              input="")

    unreachable = cli("get", "some-id", "--url", dead)
    assert unreachable.returncode == 1 and unreachable.stdout == ""
    assert unreachable.stderr.count("\n") == 1 and "connection_error" in unreachable.stderr

    usage = cli("submit")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1

    missing = cli("submit", "synthetic", str(tmp_path / "nope.json"), "--url", dead)
    assert missing.returncode == 2 and "cannot read" in missing.stderr

    bad = cli("bench", "synthetic", "--rate", "0", "--duration", "1", "--url", dead)
    assert bad.returncode == 2 and "--rate" in bad.stderr


def test_secrets_prints_fresh_env_lines(capsys: pytest.CaptureFixture[str]) -> None:
    from asyncinfer.cli import main

    assert main(["secrets"]) == 0
    first = capsys.readouterr().out
    assert main(["secrets"]) == 0
    lines = dict(line.split("=", 1) for line in first.splitlines())
    assert set(lines) == {"ASYNCINFER_WEBHOOK_SECRET", "FLOWER_PASSWORD"}
    assert lines["ASYNCINFER_WEBHOOK_SECRET"].startswith("whsec_")
    assert capsys.readouterr().out != first

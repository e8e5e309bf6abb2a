"""The bare HTTP server: a trivial FastAPI app on uvicorn with the gateway's server settings.

It answers the same routes the load generator drives on our gateway, built the same way
(see create_app), doing no work: the submit
route reads the body and answers 202 with a fixed small job, the poll route answers a fixed final
job. What it can serve is the ceiling of any Python ASGI service on this machine (and of the load
generator driving it).

    python -m bench.trivial_server --port 8123
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic_core import to_json


def create_app() -> FastAPI:
    # Configured as the gateway is (gateway/app.py): telemetry hooks off, and the two job routes
    # as plain Starlette routes answering with pydantic-core's JSON encoder.
    app = FastAPI(title="trivial", telemetry={"tracing": False, "metrics": False, "logs": False})
    counter = itertools.count()

    def reply(body: dict[str, Any], status: int, **headers: str) -> Response:
        return Response(to_json(body), status_code=status, media_type="application/json",
                        headers=headers)

    async def submit(request: Request) -> Response:
        await request.body()
        job_id = f"{next(counter):032x}"
        return reply({"id": job_id, "model": request.path_params["model"], "status": "queued"},
                     202, Location=f"/v1/jobs/{job_id}")

    async def get_job(request: Request) -> Response:
        request.query_params.get("wait")
        return reply({"id": request.path_params["job_id"], "status": "succeeded",
                      "output": {"label": 0}, "metrics": {"batch_size": 1}}, 200)

    app.add_route("/v1/models/{model}/jobs", submit, methods=["POST"])
    app.add_route("/v1/jobs/{job_id}", get_job, methods=["GET"])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The same uvicorn settings as `python -m gateway` (gateway/__main__.py).
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info",
                access_log=False)


if __name__ == "__main__":
    main()

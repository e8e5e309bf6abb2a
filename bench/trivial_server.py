"""The bare HTTP server: a trivial FastAPI app on uvicorn with the gateway's server settings.

It answers the same routes the load generator drives on our gateway, doing no work: the submit
route reads the body and answers 202 with a fixed small job, the poll route answers a fixed final
job. What it can serve is the ceiling of any Python ASGI service on this machine (and of the load
generator driving it).

    python -m bench.trivial_server --port 8123
"""

from __future__ import annotations

import argparse
import itertools

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def create_app() -> FastAPI:
    app = FastAPI(title="trivial")
    counter = itertools.count()

    @app.post("/v1/models/{model}/jobs", status_code=202)
    async def submit(model: str, request: Request) -> JSONResponse:
        await request.body()
        job_id = f"{next(counter):032x}"
        return JSONResponse({"id": job_id, "model": model, "status": "queued"}, status_code=202,
                            headers={"Location": f"/v1/jobs/{job_id}"})

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, wait: float = 0.0) -> JSONResponse:
        return JSONResponse({"id": job_id, "status": "succeeded", "output": {"label": 0},
                             "metrics": {"batch_size": 1}})

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

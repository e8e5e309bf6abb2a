"""OpenAPI entries for the two routes served as plain Starlette routes (submit one job, read a
job), which FastAPI cannot describe by itself. The shapes are those of DESIGN §7."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from shared.jobs import Job

_JOB = {"$ref": "#/components/schemas/Job"}
_ERROR = {"description": "Contract error: {\"error\": {\"type\", \"message\", ...}}"}
_JOB_RESPONSE = {"content": {"application/json": {"schema": _JOB}}}


def _param(name: str, where: str, schema: dict[str, Any], doc: str,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema,
            "description": doc}


LEAN_PATHS: dict[str, dict[str, Any]] = {
    "/v1/models/{model}/jobs": {"post": {
        "summary": "Submit one job",
        "parameters": [
            _param("model", "path", {"type": "string"}, "served model name", required=True),
            _param("Prefer", "header", {"type": "string"},
                   "`wait=N`: answer 200 with the final job if it ends within N seconds"),
            _param("Idempotency-Key", "header", {"type": "string"},
                   "the same key and body return the first job instead of a new one"),
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["input"], "properties": {
                "input": {"description": "validated against the model's Input schema"},
                "priority": {"enum": ["high", "normal", "low"], "default": "normal"},
                "ttl_s": {"type": "number", "exclusiveMinimum": 0},
                "webhook": {"type": "string", "format": "uri"}}}}}},
        "responses": {"202": {"description": "queued", **_JOB_RESPONSE},
                      "200": {"description": "final within Prefer: wait", **_JOB_RESPONSE},
                      **{code: _ERROR for code in ("401", "404", "409", "413", "422", "429",
                                                   "503")}},
    }},
    "/v1/jobs/{job_id}": {"get": {
        "summary": "Read a job, optionally long-polling until it is final",
        "parameters": [
            _param("job_id", "path", {"type": "string"}, "job id", required=True),
            _param("wait", "query", {"type": "number", "default": 0},
                   "seconds to wait for a final state (capped by max_wait_s)"),
        ],
        "responses": {"200": {"description": "the job", **_JOB_RESPONSE},
                      **{code: _ERROR for code in ("401", "404", "422", "503")}},
    }},
}


def document_lean_routes(app: FastAPI) -> None:
    """Make `app.openapi()` include LEAN_PATHS and the Job schema they refer to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, methods in LEAN_PATHS.items():
                schema["paths"].setdefault(path, {}).update(methods)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Job"] = Job.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in components["Job"].pop("$defs", {}).items():
                components.setdefault(name, sub)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

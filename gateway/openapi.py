"""The OpenAPI description of the gateway: every route with every status and content type it can
answer (DESIGN §7), in the contract's error shape.

Submits are described per served model (`/v1/models/synthetic/jobs`, ...), each with that model's
input schema, so a client generator (or schemathesis) knows exactly what each accepts; the
routing itself stays generic. The routes served as plain Starlette routes (submit one, read one)
are added here by hand; the others' FastAPI-made entries get their responses from the same table.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.inputs import MAX_TTL_S, public_schema
from shared.jobs import Job
from shared.modelspec import ModelSpec
from shared.settings import Settings

_REF = "#/components/schemas/{model}"
_JOB = {"$ref": "#/components/schemas/Job"}
_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"},
                                            "message": {"type": "string"}}}}}
_WHY = {
    "401": "missing or unknown API key",
    "404": "no such model or job (a job of another API key reads as missing)",
    "409": "already final (cancel), or an Idempotency-Key reused with another body",
    "413": "body over max_body_bytes",
    "422": "invalid input; `field` names the first bad field",
    "429": "backlog of the model, or of this API key, at its limit, or the job's deadline_ms "
           "cannot be met (`deadline_unmeetable`); see Retry-After",
    "503": "Redis unreachable",
}


def _error(code: str) -> dict[str, Any]:
    return {"description": _WHY[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}},
            **extra}


def _param(name: str, where: str, schema: dict[str, Any], doc: str,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema,
            "description": doc}


def _responses(ok: dict[str, dict[str, Any]], *errors: str) -> dict[str, Any]:
    return {**ok, **{code: _error(code) for code in errors}}


_JOB_ID = _param("job_id", "path", {"type": "string"}, "job id", required=True)
# One Server-Sent Event of a job's stream: `data` is the job JSON.
_SSE_EVENT = {"type": "object", "required": ["event", "data", "id"], "properties": {
    "event": {"type": "string", "enum": ["queued", "running", "succeeded", "failed",
                                         "canceled", "expired"]},
    "id": {"type": "string", "enum": ["1", "2", "3"]},
    "data": {"type": "string", "contentMediaType": "application/json"}}}
# No link to the cancel: DELETE cancels and the job stays readable (status `canceled`), which a
# stateful tester following the link would take for a deleted resource still being served.
_LINKS = {"GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/id"}}}


def _envelope(settings: Settings) -> dict[str, Any]:
    props: dict[str, Any] = {
        "priority": {"enum": ["high", "normal", "low"], "default": "normal"},
        "ttl_s": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_TTL_S,
                  "description": "seconds the job may wait queued before it expires"}}
    if settings.webhook_secret.strip():  # without a secret webhooks are refused
        props["webhook"] = {"type": ["string", "null"], "maxLength": 2048,
                            "pattern": "^https?://",
                            "description": "POSTed the final job (Standard Webhooks signed); "
                            "private, loopback and link-local targets are refused unless "
                            "allow-listed"}
    return props


def _submit_paths(spec: ModelSpec, settings: Settings,
                  auth: str) -> tuple[dict[str, Any], str]:
    name = f"{spec.name.title().replace('_', '').replace('-', '')}Input"
    headers = [
        _param("Idempotency-Key", "header", {"type": "string"},
               "a retry with the same key and body returns the first job(s); scoped to the API "
               "key and model, remembered as long as the jobs are readable"),
    ]
    item = {"$ref": f"#/components/schemas/{name}"}
    one = {"type": "object", "required": ["input"],
           "properties": {"input": item, **_envelope(settings)}}
    many = {"type": "object", "required": ["inputs"],
            "properties": {"inputs": {"type": "array", "items": item, "minItems": 1,
                                      "maxItems": 10_000}, **_envelope(settings)}}
    located = {"headers": {"Location": {"schema": {"type": "string"},
                                        "description": "/v1/jobs/{id}"}}, "links": _LINKS}
    errors = (auth, "409", "413", "422", "429", "503")
    return {
        f"/v1/models/{spec.name}/jobs": {"post": {
            "operationId": f"submit_{spec.name}", "summary": f"Submit one {spec.name} job",
            "parameters": [*headers, _param(
                "Prefer", "header", {"type": "string"},
                "`wait=N`: answer 200 with the final job if it ends within N seconds")],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": one}}},
            "responses": _responses({"202": _json("queued", _JOB, **located),
                                     "200": _json("final within Prefer: wait", _JOB,
                                                  **located)}, *errors)}},
        f"/v1/models/{spec.name}/jobs:batch": {"post": {
            "operationId": f"submit_batch_{spec.name}",
            "summary": f"Submit {spec.name} jobs, one per input",
            "parameters": headers,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": many}}},
            "responses": _responses({"202": _json("queued, in input order", {
                "type": "object", "required": ["jobs"],
                "properties": {"jobs": {"type": "array", "items": _JOB}}})}, *errors)}},
    }, name


def document_routes(app: FastAPI, specs: dict[str, ModelSpec], settings: Settings,
                    auth_enabled: bool) -> None:
    """Make `app.openapi()` the full description (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components["Error"] = _ERROR_SCHEMA
        _add(components, Job.model_json_schema(ref_template=_REF), "Job")
        auth = "401"
        paths = schema["paths"]
        for spec in specs.values():
            model_paths, input_name = _submit_paths(spec, settings, auth)
            paths.update(model_paths)
            _add(components, public_schema(
                spec.cls.Input.model_json_schema(ref_template=_REF), spec.cls.Input,
                settings.fault_injection), input_name)
        paths["/v1/jobs/{job_id}"] = {
            "get": {"operationId": "get_job",
                    "summary": "Read a job, optionally long-polling until it is final",
                    "parameters": [_JOB_ID, _param(
                        "wait", "query", {"type": "number", "default": 0},
                        "seconds to wait for a final state (clamped to [0, max_wait_s])")],
                    "responses": _responses({"200": _json("the job", _JOB)},
                                            auth, "404", "422", "503")},
            "delete": {**paths.get("/v1/jobs/{job_id}", {}).get("delete", {}),
                       "summary": "Cancel a queued or running job (it stays readable)",
                       "parameters": [_JOB_ID],
                       "responses": _responses({"200": _json("the job, now canceled", _JOB)},
                                               auth, "404", "409", "503")}}
        paths["/v1/jobs/{job_id}/events"]["get"].update({
            "summary": "Follow a job's status changes (Server-Sent Events)",
            "parameters": [_JOB_ID, _param(
                "Last-Event-ID", "header", {"type": "string"},
                "resume after this event id (1 queued, 2 running, 3 final)")],
            "responses": _responses({"200": {
                "description": "one event per status change, closed after the final one (or "
                               "after max_wait_s: reconnect with Last-Event-ID)",
                "content": {"text/event-stream": {"schema": _SSE_EVENT}}}},
                auth, "404", "503")})
        any_object = {"type": "object"}
        paths["/v1/models"]["get"]["responses"] = _responses(
            {"200": _json("served models", any_object)}, auth, "503")
        paths["/v1/models/{model}"]["get"]["responses"] = _responses(
            {"200": _json("one model", any_object)}, auth, "404", "503")
        paths["/healthz"]["get"]["responses"] = {"200": _json("alive", any_object)}
        paths["/readyz"]["get"]["responses"] = _responses(
            {"200": _json("ready: Redis answers", any_object)}, "503")
        paths["/metrics"]["get"]["responses"] = _responses({"200": {
            "description": "Prometheus text exposition",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}, "503")
        if auth_enabled:
            schema["components"]["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer"}}
            for path, methods in paths.items():
                if path not in ("/healthz", "/readyz", "/metrics"):
                    for operation in methods.values():
                        operation["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add(components: dict[str, Any], schema: dict[str, Any], name: str) -> None:
    """Put `schema` and the models it refers to ($defs) among the components."""
    for sub_name, sub in schema.pop("$defs", {}).items():
        components.setdefault(sub_name, sub)
    components[name] = schema

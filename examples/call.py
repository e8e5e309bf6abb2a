"""Call a running asyncinfer from Python: one job and waiting for it, then a batch of jobs."""

from __future__ import annotations

from asyncinfer import ApiError, Client

with Client("http://127.0.0.1:8000") as client:  # api_key="..." when keys are on
    job = client.run("upper", {"text": "hello"}, timeout_s=30)
    print(job.status, job.output)
    jobs = client.submit_many("upper", [{"text": t} for t in ("a", "b", "c")])
    print([client.get(j.id, wait=30).output for j in jobs])
    try:
        client.submit("upper", {"text": ""})
    except ApiError as exc:  # 422: the input does not validate
        print(exc.status, exc.type, exc.message)

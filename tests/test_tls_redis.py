"""A managed-Redis shape end to end: `redis-server --tls-port` with a self-signed certificate, a
password and db 3. One job goes through every role as a real process (gateway, batcher, the
autoscaler starting a worker, Flower watching), and the password is in no process's arguments
and no log."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from asyncinfer.client import Client
from shared.procs import free_port, wait_port
from shared.redisconn import connect_sync, redact
from shared.redisserver import RedisServer, ServerTls
from shared.settings import Settings
from tests.conftest import Procs, wait_until

PASSWORD = "tls-test-Pa55word-7c1f"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_certificates(where: Path) -> ServerTls:
    """A CA and a server certificate for 127.0.0.1 signed by it (files in `where`)."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
             signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.DNSName("localhost")]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asyncinfer test CA")])
    ca = cert("asyncinfer test CA", ca_key, ca_name, ca_key, ca=True)
    server = cert("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    return ServerTls(
        cert_file=_write(where / "server.crt", server.public_bytes(pem)),
        key_file=_write(where / "server.key", server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
        ca_file=_write(where / "ca.crt", ca.public_bytes(pem)))


@pytest.mark.slow
def test_one_job_through_every_role_over_tls_with_a_password_and_db_3(tmp_path: Path) -> None:
    tls = make_certificates(tmp_path)
    server = RedisServer(tmp_path / "redis", password=PASSWORD, tls=tls).start()
    url = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/3"
    settings = Settings(redis_url=url, redis_tls_ca_file=str(tls.ca_file),
                        models=Path(__file__).parent / "models.toml", devices="cpu:1",
                        heartbeat_interval_s=0.5, lease_ttl_s=2)
    procs = Procs(settings, tmp_path / "logs")
    try:
        procs.batcher()
        procs.start("autoscaler", "workers.autoscaler", ASYNCINFER_LOG_DIR=str(tmp_path / "logs"))
        flower_port = free_port()
        # Flower as compose and `asyncinfer up` run it: broker from the settings, credentials
        # from the environment.
        procs.start("flower", "celery", "-A", "shared.flowerapp", "flower",
                            f"--port={flower_port}", "--address=127.0.0.1",
                            FLOWER_BASIC_AUTH="admin:flower-pw")
        gateway = procs.gateway()
        assert httpx.get(f"{gateway}/readyz", timeout=10).status_code == 200
        with Client(gateway) as client:
            job = client.run("synthetic", {"x": 21}, timeout_s=90)
        assert job.status == "succeeded" and job.output == {"y": 42.0}, procs.logs()
        assert job.metrics.worker and job.metrics.worker.startswith("synthetic-1-")

        assert wait_port("127.0.0.1", flower_port, 30), procs.logs()

        def flower_sees_the_worker() -> bool:
            r = httpx.get(f"http://127.0.0.1:{flower_port}/api/workers?refresh=1",
                          auth=("admin", "flower-pw"), timeout=10)
            return r.status_code == 200 and any(n.startswith("synthetic-1-") for n in r.json())

        wait_until(flower_sees_the_worker, 60, "Flower to list the worker over TLS")

        # Everything went to db 3; db 0, where a client that skipped SELECT would write, is empty.
        db3 = connect_sync(settings)
        db0 = connect_sync(settings.model_copy(update={"redis_url": url[:-1] + "0"}))
        assert db3.exists(f"ai:job:{job.id}") and db0.dbsize() == 0
        db3.close()
        db0.close()

        exposed = [pid for pid in _pids() if PASSWORD.encode() in _cmdline(pid)]
        assert exposed == [], "password in the arguments of " + ", ".join(
            _cmdline(p).decode(errors="replace")[:200] for p in exposed)
        for log in (tmp_path / "logs").glob("*.log"):
            assert PASSWORD not in log.read_text(errors="replace"), log.name
        assert PASSWORD not in redact(url) and "***" in redact(url)
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.stop_all()
        server.stop()


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""

"""The pipelined client against a real Redis: replies matched to callers under concurrency,
error replies, scripts after a flush or restart, a dead and a silent server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
from redis import exceptions as rx

from shared.muxredis import MuxRedis
from shared.redisconn import connect_mux
from shared.redisserver import RedisServer
from shared.settings import Settings


def mux_of(url: str, timeout_s: float) -> MuxRedis:
    return connect_mux(Settings(redis_url=url, redis_timeout_s=timeout_s))


async def test_concurrent_callers_each_get_their_own_reply_over_one_connection(
        redis_server: RedisServer) -> None:
    plain = redis.Redis.from_url(redis_server.url)
    before = int(plain.info("clients")["connected_clients"])
    mux = mux_of(redis_server.url, 5)
    try:
        await asyncio.gather(*(mux.execute("SET", f"mux:{i}", i) for i in range(500)))
        values = await asyncio.gather(*(mux.execute("GET", f"mux:{i}") for i in range(500)))
        assert values == [str(i) for i in range(500)]
        assert int(plain.info("clients")["connected_clients"]) == before + 1
    finally:
        await mux.aclose()
        plain.close()


async def test_an_error_reply_fails_only_its_caller(redis_server: RedisServer) -> None:
    mux = mux_of(redis_server.url, 5)
    try:
        await mux.execute("SET", "mux:str", "x")
        replies: list[object] = await asyncio.gather(
            mux.execute("HGETALL", "mux:str"), mux.execute("GET", "mux:str"),
            return_exceptions=True)
        bad, good = replies
        assert isinstance(bad, rx.ResponseError) and "WRONGTYPE" in str(bad)
        assert good == "x"
        await mux.execute("HSET", "mux:h", "a", "1", "b", "2")
        assert await mux.hgetall("mux:h") == {"a": "1", "b": "2"}
    finally:
        await mux.aclose()


async def test_a_script_is_loaded_again_after_a_flush(redis_server: RedisServer) -> None:
    source = "return ARGV[1] .. KEYS[1]"
    plain = redis.Redis.from_url(redis_server.url)
    sha = str(plain.script_load(source))
    plain.script_flush()
    plain.close()
    mux = mux_of(redis_server.url, 5)
    try:
        assert await mux.evalsha(sha, source, ["k"], ["v"]) == "vk"
    finally:
        await mux.aclose()


async def test_the_selected_database_is_used(redis_server: RedisServer) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    mux = mux_of(url, 5)
    try:
        await mux.execute("SET", "mux:db", "three")
    finally:
        await mux.aclose()
    plain = redis.Redis.from_url(url)
    assert plain.get("mux:db") == b"three"
    plain.close()


async def test_commands_fail_while_redis_is_down_and_work_after_its_restart(
        tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r").start()
    mux = mux_of(server.url, 2)
    try:
        assert await mux.execute("PING") == "PONG"
        server.kill()
        with pytest.raises(rx.ConnectionError):
            await mux.execute("PING")
        with pytest.raises(rx.ConnectionError):  # still down: a clean error, no hang
            await mux.execute("PING")
        server.start()
        assert await mux.execute("PING") == "PONG"
    finally:
        await mux.aclose()
        server.stop()


async def test_a_silent_server_times_out_every_waiting_command() -> None:
    received = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while data := await reader.read(65536):
            received += len(data)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mux = mux_of(f"redis://127.0.0.1:{port}/0", 0.3)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(*(mux.execute("PING") for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, rx.TimeoutError) for r in results), results
        assert loop.time() - started < 5  # bounded by the timeout, not hung
        assert received > 0
    finally:
        await mux.aclose()
        server.close()
        await server.wait_closed()


class _FakeRedis:
    """A RESP server we script: logs each connection's commands, answers AUTH/SELECT after a
    delay, and can answer one command with an error reply."""

    def __init__(self, hello_delay_s: float = 0.2, error_for: bytes | None = None) -> None:
        self.log: list[list[tuple[float, list[bytes]]]] = []
        self.hello_delay_s = hello_delay_s
        self.error_for = error_for
        self.hello_answered_at: list[float] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import hiredis

        conn: list[tuple[float, list[bytes]]] = []
        self.log.append(conn)
        parser = hiredis.Reader()
        loop = asyncio.get_running_loop()
        while data := await reader.read(65536):
            parser.feed(data)
            while (cmd := parser.gets()) is not False:
                conn.append((loop.time(), cmd))
                name = cmd[0].upper()
                if name in (b"AUTH", b"SELECT"):
                    await asyncio.sleep(self.hello_delay_s)
                    self.hello_answered_at.append(loop.time())
                    writer.write(b"+OK\r\n")
                elif self.error_for is not None and name == self.error_for:
                    self.error_for = None
                    writer.write(b"-READONLY You can't write against a read only replica.\r\n")
                else:
                    writer.write(b"+OK\r\n")
            await writer.drain()
        writer.close()


async def test_auth_and_select_are_answered_before_any_queued_command_runs() -> None:
    fake = _FakeRedis()
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mux = mux_of(f"redis://app:s3cret@127.0.0.1:{port}/3", 5)
    try:
        # Many callers at once while the handshake is slow: none may overtake it.
        await asyncio.gather(*(mux.execute("SET", f"k{i}", i) for i in range(50)))
    finally:
        await mux.aclose()
        server.close()
        await server.wait_closed()
    [conn] = fake.log
    assert conn[0][1] == [b"AUTH", b"app", b"s3cret"] and conn[1][1] == [b"SELECT", b"3"]
    assert all(at >= fake.hello_answered_at[-1] for at, _ in conn[2:])
    assert len(conn) == 52


async def test_a_readonly_reply_drops_the_connection_and_the_next_command_reconnects() -> None:
    fake = _FakeRedis(hello_delay_s=0, error_for=b"SET")
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mux = mux_of(f"redis://:pw@127.0.0.1:{port}/2", 5)
    try:
        with pytest.raises(rx.ConnectionError, match="READONLY"):
            await mux.execute("SET", "k", "v")
        assert await mux.execute("SET", "k", "v") == "OK"
    finally:
        await mux.aclose()
        server.close()
        await server.wait_closed()
    assert len(fake.log) == 2  # a new connection, with its own AUTH and SELECT
    assert [c[1][0] for c in fake.log[1][:2]] == [b"AUTH", b"SELECT"]


async def test_password_and_db_against_a_real_server_across_a_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r", password="pw-123").start()
    url = f"redis://:pw-123@127.0.0.1:{server.port}/3"
    mux = mux_of(url, 2)
    try:
        assert await mux.execute("SET", "before", "1") == "OK"
        server.kill()
        with pytest.raises(rx.ConnectionError):
            await mux.execute("PING")
        server.start()
        await asyncio.gather(*(mux.execute("SET", f"after{i}", i) for i in range(20)))
    finally:
        await mux.aclose()
    plain = redis.Redis(port=server.port, password="pw-123", db=3)
    assert plain.exists("before", *(f"after{i}" for i in range(20))) == 21
    assert redis.Redis(port=server.port, password="pw-123", db=0).dbsize() == 0
    plain.close()
    server.stop()
    with pytest.raises(rx.AuthenticationError):
        bad = mux_of(f"redis://:wrong@127.0.0.1:{server.start().port}/3", 2)
        try:
            await bad.execute("PING")
        finally:
            await bad.aclose()
            server.stop()

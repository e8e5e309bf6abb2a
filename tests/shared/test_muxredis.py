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

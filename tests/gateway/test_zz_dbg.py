import asyncio, gc, pytest
import httpx
from gateway.app import create_app

def chain(coro):
    while coro is not None:
        fr = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if fr: print("  ", fr.f_code.co_filename, fr.f_lineno, fr.f_code.co_name)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)

@pytest.mark.parametrize("i", range(20))
async def test_dbg(settings, i):
    app = create_app(settings)
    async def dump():
        await asyncio.sleep(4)
        for t in asyncio.all_tasks():
            print(t); chain(t.get_coro())
        for o in gc.get_objects():
            if isinstance(o, asyncio.TaskGroup):
                for t in o._tasks:
                    print(t); chain(t.get_coro())
    t = asyncio.create_task(dump())
    async with app.router.lifespan_context(app):
        await asyncio.sleep(i * 0.002)
    t.cancel()

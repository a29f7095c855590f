"""The shadow mirror (conveyor.runtime.serving.shadow) against a real HTTP server on 127.0.0.1: the share
it samples, how answers are compared, and that a slow or absent shadow never makes a caller wait."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web
from prometheus_client import CollectorRegistry

from conveyor.runtime.serving.shadow import Sampler, ShadowMirror, agree, answers


def test_sampler_is_an_exact_share() -> None:
    for percent in (0, 1, 30, 50, 100):
        s = Sampler(percent)
        assert sum(s() for _ in range(1000)) == percent * 10


def test_answers_of_v1_and_v2_and_agreement() -> None:
    v1 = json.dumps({"predictions": [{"label": "1", "probabilities": {"0": 0.1, "1": 0.9}}, {"label": "0"}]})
    assert answers(v1.encode()) == ["1", "0"]
    v2 = json.dumps({"outputs": [{"name": "probabilities", "data": [0.1]}, {"name": "label", "data": ["a"]}]})
    assert answers(v2.encode()) == ["a"]
    assert answers(b"not json") is None and answers(b'{"error": "x"}') is None
    assert agree(["1", "0"], ["1", "0"]) and not agree(["1", "0"], ["1", "1"]) and not agree(["1"], ["1", "0"])
    assert agree([1.0], [1.0 + 1e-9]) and not agree([1.0], [1.1])


def _value(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("conveyor_shadow_requests_total", {
        "model_name": "m", "model_version": "v1", "shadow_version": "v2", "result": result}) or 0.0


async def _serve(handler: object) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/models/{name}", handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


def test_mirror_counts_agreement_errors_and_drops_without_waiting() -> None:
    async def scenario() -> None:
        registry = CollectorRegistry()
        seen: list[str] = []
        delay = {"s": 0.0}

        async def shadow(request: web.Request) -> web.Response:
            seen.append(request.match_info["name"])
            await asyncio.sleep(delay["s"])
            rows = (await request.json())["instances"]
            return web.json_response({"predictions": [{"label": "1" if r["x"] > 0 else "0"} for r in rows]})

        runner, url = await _serve(shadow)
        mirror = ShadowMirror(url, model_name="m", model_version="v1", shadow_model="m-shadow", shadow_version="v2",
                              timeout_s=0.5, queue_size=4, workers=2, registry=registry)
        body = json.dumps({"instances": [{"x": 1}]}).encode()
        mirror.offer("/v1/models/m:predict", "application/json", body, b'{"predictions": [{"label": "1"}]}')
        mirror.offer("/v1/models/m:predict", "application/json", body, b'{"predictions": [{"label": "0"}]}')
        await mirror.drain()
        assert seen == ["m-shadow:predict"] * 2
        assert (_value(registry, "agree"), _value(registry, "disagree")) == (1, 1)

        delay["s"] = 2.0  # slower than the timeout: offers return at once, extra ones are dropped
        started = time.perf_counter()
        for _ in range(20):
            mirror.offer("/v1/models/m:predict", "application/json", body, b'{"predictions": [{"label": "1"}]}')
        assert time.perf_counter() - started < 0.05
        await mirror.drain()
        # The queue holds 4: those time out, the other 16 were dropped and counted; none was waited for.
        assert (_value(registry, "timeout"), _value(registry, "dropped")) == (4, 16)

        await runner.cleanup()  # the shadow is gone
        mirror.offer("/v1/models/m:predict", "application/json", body, b'{"predictions": [{"label": "1"}]}')
        await mirror.drain()
        assert _value(registry, "error") == 1
        await mirror.close()

    asyncio.run(scenario())


def test_from_env_needs_a_url() -> None:
    assert ShadowMirror.from_env("m", "v1", {}) is None
    m = ShadowMirror.from_env("m", "v1", {"CONVEYOR_SHADOW_URL": "http://h:1/", "CONVEYOR_SHADOW_PERCENT": "25",
                                          "CONVEYOR_SHADOW_MODEL": "m-shadow", "CONVEYOR_SHADOW_VERSION": "v2"})
    assert m is not None and m.sample.percent == 25
    assert m.target("/v2/models/m/infer") == "http://h:1/v2/models/m-shadow/infer"

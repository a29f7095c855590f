"""The local traffic router: the ingress and Knative's activator of one machine, for the local executor.

One ``Router`` per InferenceService listens on a fixed loopback port for the InferenceService's life
(its ``status.url``) and sends each request to one of the predictors of its versions by the live weights.
Knative mode: what Knative would split, the spec's ``canaryTrafficPercent``. Standard mode: what a
Gateway API gateway would do, the weights of the HTTPRoute whose backendRefs are the InferenceService's
predictor Services (``route_weights``; the operator writes it, modeldeployment/route.py); without one,
what KServe v0.20.0's own route does, every request to the stable predictor (``canary[].trafficPercent``
only sizes the canary there). The backends are KServe's real model server.

The split is a smooth weighted round robin (nginx's), not a coin toss: over any 100 requests a 20/80
split sends exactly 20 to the canary, so a test sees the weight it set rather than a sample of it. A
backend that is not Ready gets no traffic (as Knative routes only to ready revisions). Bodies stream
both ways (aiohttp, pooled keep-alive connections to the backends); the answering version is named in
the ``x-conveyor-version`` response header, beside the ``model_version`` the predictor puts in its body.

gRPC (HTTP/2 cleartext, the predictors' h2c port) takes a port of its own (``grpc_url``), opened once a
backend serves gRPC (``Backend.grpc_address``): each call goes to one of those backends by the same
weights (a round robin of its own, so over any 100 calls a 20/80 split again sends exactly 20), as
Knative's ingress balances HTTP/2 per request. The call is forwarded as bytes with its metadata and
deadline (grpcio's generic handlers; the V2 inference service has unary RPCs only), the predictor's
status and details come back unchanged, and the answering version is named in the initial metadata
``x-conveyor-version``.

A development stand-in, never shipped in an image: on a cluster this is Knative or the Gateway API.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

log = logging.getLogger("conveyor.local-router")

# Not forwarded: they describe one connection, not the request (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Backend:
    version: str
    url: str  # http://127.0.0.1:PORT
    weight: int  # percent
    grpc_address: str | None = None  # 127.0.0.1:PORT of its gRPC (h2c) port, when it serves gRPC


def route_weights(routes: Sequence[dict[str, Any]], services: dict[str, str]) -> dict[str, int] | None:
    """What a gateway sends where, per version, from the HTTPRoutes of a namespace: the oldest route (the
    Gateway API's precedence between routes) whose backendRefs name only Services in `services` (Service
    name -> version), each backend at its weight (1 when unset, as the Gateway API defaults it); None when
    no route names them. Rules are not told apart: the operator's route has one."""
    ordered = sorted(
        routes, key=lambda r: (r["metadata"].get("creationTimestamp") or "", r["metadata"]["name"])
    )
    for route in ordered:
        refs = [
            ref
            for rule in (route.get("spec") or {}).get("rules") or []
            for ref in rule.get("backendRefs") or []
        ]
        if refs and all(
            ref.get("name") in services and ref.get("kind", "Service") == "Service" for ref in refs
        ):
            weights: dict[str, int] = {}
            for ref in refs:
                version = services[ref["name"]]
                weights[version] = weights.get(version, 0) + int(ref.get("weight", 1))
            return weights
    return None


class WeightedChoice:
    """Smooth weighted round robin over the backends with a weight above zero."""

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self.backends = [b for b in backends if b.weight > 0]
        self._current = [0] * len(self.backends)

    def pick(self) -> Backend | None:
        if not self.backends:
            return None
        total = 0
        for i, b in enumerate(self.backends):
            self._current[i] += b.weight
            total += b.weight
        best = max(range(len(self.backends)), key=self._current.__getitem__)
        self._current[best] -= total
        return self.backends[best]


class Router:
    """One InferenceService's entry point (see the module docstring)."""

    def __init__(self, name: str, session_factory: Any) -> None:
        self.name = name
        self.port = 0
        self.grpc_port = 0  # 0 until a backend serves gRPC
        self._choice = WeightedChoice()
        self._grpc_choice = WeightedChoice()
        self._session_factory = session_factory
        self._runner: web.AppRunner | None = None
        self._grpc_server: grpc.aio.Server | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}  # by backend gRPC address

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str | None:
        return f"grpc://127.0.0.1:{self.grpc_port}" if self.grpc_port else None

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """The ready predictors and their weights; keeps the round robin's position when unchanged."""
        if [b for b in backends if b.weight > 0] != self._choice.backends:
            self._choice = WeightedChoice(backends)
        grpc_backends = [b for b in backends if b.grpc_address]
        if [b for b in grpc_backends if b.weight > 0] != self._grpc_choice.backends:
            self._grpc_choice = WeightedChoice(grpc_backends)
        for address in set(self._channels) - {b.grpc_address for b in grpc_backends}:
            asyncio.ensure_future(self._channels.pop(address).close())  # a predictor that is gone

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def start_grpc(self) -> None:
        """Open the gRPC port (once)."""
        if self._grpc_server is not None:
            return
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_GrpcForward(self),))
        self.grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._grpc_server = server

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=None)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def forward_grpc(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        backend = self._grpc_choice.pick()  # only backends with a grpc_address
        if backend is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: no ready predictor serving gRPC")
        address = str(backend.grpc_address)
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        metadata = [
            (k, v) for k, v in context.invocation_metadata() or () if not k.startswith((":", "grpc-"))
        ]
        await context.send_initial_metadata((("x-conveyor-version", backend.version),))
        try:
            return await channel.unary_unary(method)(
                request, metadata=metadata, timeout=context.time_remaining()
            )
        except grpc.aio.AioRpcError as e:  # the predictor's status and details, as the client would see them
            await context.abort(e.code(), e.details() or "")

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        backend = self._choice.pick()
        if backend is None:
            return web.json_response({"error": f"{self.name}: no ready predictor to route to"}, status=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            async with self._session_factory().request(
                request.method,
                backend.url + request.rel_url.raw_path_qs,
                headers=headers,
                data=request.content if request.can_read_body else None,
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        response.headers.add(key, value)
                response.headers["x-conveyor-version"] = backend.version
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (ClientError, OSError, TimeoutError) as e:
            return web.json_response(
                {"error": f"{self.name}: predictor {backend.version} at {backend.url} failed: {e}"},
                status=502,
            )


class _GrpcForward(grpc.GenericRpcHandler):
    """Every method, unary-unary, as bytes (no (de)serializers): the router forwards it untouched."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self.router.forward_grpc(method, request, context)

        return grpc.unary_unary_rpc_method_handler(forward)


class RouterHost:
    """Runs the routers of every InferenceService on one asyncio loop in a background thread, so the
    executor's synchronous poll loop can create, re-weight and stop them."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="local-router", daemon=True)
        self._thread.start()
        self._session: ClientSession | None = None
        self.routers: dict[Any, Router] = {}

    def _client(self) -> ClientSession:
        if self._session is None:
            self._session = ClientSession(
                connector=TCPConnector(limit=0, force_close=False),
                timeout=ClientTimeout(total=None, sock_connect=5),
                auto_decompress=False,
            )
        return self._session

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def ensure(self, key: Any, name: str) -> Router:
        router = self.routers.get(key)
        if router is None:
            router = Router(name, self._client)
            self._run(router.start())
            self.routers[key] = router
            log.info("router for %s on %s", key, router.url)
        return router

    def set_backends(self, key: Any, backends: Sequence[Backend]) -> None:
        router = self.routers[key]
        if router.grpc_port == 0 and any(b.grpc_address for b in backends):
            self._run(router.start_grpc())  # grpc_url is known when this returns
        self._loop.call_soon_threadsafe(router.set_backends, list(backends))

    def remove(self, key: Any) -> None:
        router = self.routers.pop(key, None)
        if router is not None:
            self._run(router.stop())

    def shutdown(self) -> None:
        for key in list(self.routers):
            self.remove(key)
        if self._session is not None:
            self._run(self._session.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

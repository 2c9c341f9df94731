"""How HTTP requests reach the protocols: the hot-path endpoints as plain ASGI, everything else
through FastAPI, and each protocol's errors rendered by that protocol's one renderer.

A protocol supplies a `render_error(ServeError) -> Reply`; `Endpoint` (plain ASGI) and
`protocol_route` (FastAPI) apply it, so no handler builds an error response itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import URL
from starlette.responses import RedirectResponse
from starlette.routing import Route, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ServeError
from app.http.messages import Reply, send_reply
from app.http.middleware import RequestContextMiddleware
from app.observability import Metrics

logger = logging.getLogger("app")

ErrorRenderer = Callable[[ServeError], Reply]
Handler = Callable[[Scope, Receive], Awaitable[Reply]]
INTERNAL_ERROR = ServeError(500, "Internal Server Error")


class Endpoint:
    """A plain-ASGI POST endpoint: `handle` answers, `render_error` shapes every refusal;
    an unexpected exception is logged with its traceback and answered 500."""

    def __init__(self, name: str, handle: Handler, render_error: ErrorRenderer) -> None:
        self.name = name
        self.handle = handle
        self.render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["method"] != "POST":
                raise ServeError(405, "Method Not Allowed", {"Allow": "POST"})
            reply = await self.handle(scope, receive)
        except ServeError as exc:
            reply = self.render_error(exc)
        except Exception:
            logger.exception("unhandled error in %s", self.name)
            reply = self.render_error(INTERNAL_ERROR)
        await send_reply(send, reply)


def protocol_route(render_error: ErrorRenderer) -> type[APIRoute]:
    """A FastAPI route class whose ServeErrors leave through `render_error`."""

    class ProtocolRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except ServeError as exc:
                    reply = render_error(exc)
                    return Response(reply.body, reply.status, dict(reply.headers), reply.content_type.decode())

            return route

    return ProtocolRoute


class FastRoutes:
    """Route HTTP requests for `routes` (plain ASGI endpoints) to them; everything else to `rest`.

    Starlette's own Router does the same but cost the hot path measurably more per request
    (docs/performance.md); this keeps its semantics that matter here: `scope["route"]` and
    `path_params` set, and `/predict/` redirected to `/predict`.
    """

    def __init__(self, routes: list[Route], rest: ASGIApp) -> None:
        self.routes = [(route, route.path_regex.match) for route in routes]
        self.rest = rest

    def _match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        for route, match in self.routes:
            found = match(path)
            if found:
                return route, found.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = get_route_path(scope)
            matched = self._match(path)
            if matched:
                scope["route"], scope["path_params"] = matched
                await matched[0].app(scope, receive, send)
                return
            if path.endswith("/") and self._match(path.rstrip("/")):
                url = URL(scope=scope)
                await RedirectResponse(url.replace(path=url.path.rstrip("/")))(scope, receive, send)
                return
        await self.rest(scope, receive, send)


class ServiceApp(FastAPI):
    """FastAPI with one change to how requests flow: request context (id, metrics, access log)
    wraps everything, and the hot-path endpoints (`fast_routes`) are routed and answered as
    plain ASGI before FastAPI's exception middleware and router. Every other path is ordinary
    FastAPI. So middleware added to this app does not apply to the fast routes: a layer every
    request must pass belongs in `build_middleware_stack` below. FastAPI's own OpenTelemetry
    (its `telemetry`, on whenever a global provider is set) is off: the service traces and counts
    its requests itself (`app.tracing`, `app.observability`), and FastAPI's check that it is
    unconfigured cost every request three environment lookups.
    """

    def __init__(
        self,
        metrics: Metrics,
        fast_routes: list[Route],
        openapi_extras: list[Callable[[dict[str, Any]], dict[str, Any]]],
        **kwargs: Any,
    ) -> None:
        super().__init__(telemetry={"tracing": False, "metrics": False, "logs": False}, **kwargs)
        self.metrics = metrics
        self.fast_routes = fast_routes
        self.openapi_extras = openapi_extras  # the fast routes' operations, which FastAPI does not see

    def build_middleware_stack(self) -> ASGIApp:
        routed = FastRoutes(self.fast_routes, super().build_middleware_stack())
        return RequestContextMiddleware(routed, metrics=self.metrics)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            for extra in self.openapi_extras:
                schema = extra(schema)
            self.openapi_schema = schema
        return self.openapi_schema

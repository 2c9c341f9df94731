"""The application factory: `create_app(settings)` composes the service; `app` is what uvicorn serves.

Composition only: the data plane (`app.dataplane`), the worker that owns it and runs its life
(`app.worker`), the protocols' endpoints and routers (`app.protocols`, `app.routes`), and how
HTTP reaches them (`app.http.routing`). Nothing here runs at import but building the app; the
model loads in the lifespan. `python -m app` calls `create_app` with what its supervisor hands
the workers; a lone process for development is `uvicorn --factory app.main:create_app`.
"""

from __future__ import annotations

from functools import partial

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from starlette.routing import Route

from app import __version__
from app.auth import load_admin_keys, load_api_keys
from app.dataplane import DataPlane
from app.errors import ServeError
from app.http.routing import Endpoint, ServiceApp
from app.observability import ModelCollector
from app.protocols import explain, predict
from app.protocols.v2 import infer as v2_infer
from app.protocols.v2 import metadata as v2_metadata
from app.protocols.v2 import openapi as v2_openapi
from app.protocols.v2 import repository as v2_repository
from app.protocols.v2.response import render_error as v2_render_error
from app.reload.snapshot import last_reload, reload_counts
from app.routes import docs, health, metrics, model, page
from app.settings import STATIC_DIR, Settings
from app.worker import Handoff, Worker


def _served(plane: DataPlane) -> tuple[str, ...] | None:
    served = plane.model
    if served is None:
        return None
    return served.name, served.loaded.arch, served.checkpoint.sha256, str(served.device)


def _ood_baseline(plane: DataPlane) -> tuple[float, float | None] | None:
    served = plane.model
    if served is None or served.ood_threshold is None:
        return None
    return served.ood_threshold, served.ood_expected_flagged_ratio


async def _render_detail(request: Request, exc: Exception) -> Response:
    """ServeError from a FastAPI route outside v2: the service's own `{"detail": ...}` shape."""
    assert isinstance(exc, ServeError)
    reply = predict.render_error(exc)
    return Response(reply.body, reply.status, dict(reply.headers), reply.content_type.decode())


def create_app(settings: Settings | None = None, handoff: Handoff | None = None) -> FastAPI:
    """Build the service; the model loads when the app starts (its lifespan), never at import.
    `handoff`: what a supervisor gives its workers (`python -m app`)."""
    settings = settings or Settings()
    plane = DataPlane(settings, api_key_digests=load_api_keys(settings), admin_key_digests=load_admin_keys(settings))
    worker = Worker(plane, handoff)
    snapshot = worker.handoff.snapshot
    collector = ModelCollector(
        partial(_served, plane),
        lambda: reload_counts(snapshot),
        lambda: last_reload(snapshot),
        partial(_ood_baseline, plane),
    )
    plane.metrics.add_live(collector)

    predict_endpoint = Endpoint("POST /predict", partial(predict.predict, plane), predict.render_error)
    v2_endpoint = Endpoint("v2 inference", partial(v2_infer.infer, plane), v2_render_error)
    fast_routes = [
        Route("/predict", predict_endpoint),
        Route("/models/{model}/predict", predict_endpoint),
        Route("/models/{model}/versions/{version}/predict", predict_endpoint),
        Route("/v2/models/{model}/infer", v2_endpoint),
        Route("/v2/models/{model}/versions/{version}/infer", v2_endpoint),
    ]
    app = ServiceApp(
        plane.metrics,
        fast_routes,
        openapi_extras=[predict.openapi, v2_openapi.openapi],
        title="fashion-serve",
        summary="Fashion-MNIST image classification over HTTP",
        version=__version__,
        lifespan=worker.lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.worker = worker  # routes reach the data plane and the repository through it
    app.add_exception_handler(ServeError, _render_detail)
    for router in (model.router, health.router, metrics.router, docs.router, explain.router, page.router):
        app.include_router(router)
    app.include_router(v2_metadata.router)
    app.include_router(v2_repository.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app

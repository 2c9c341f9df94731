"""Dependencies handed to FastAPI path operations, as `Annotated` aliases."""

from typing import Annotated

from fastapi import Depends, Request

from app.auth import bearer_key
from app.dataplane import DataPlane


async def get_plane(request: Request) -> DataPlane:
    # async: FastAPI would run a plain `def` dependency in the threadpool, a hand-off per request.
    plane: DataPlane = request.app.state.worker.plane
    return plane


async def authorized_plane(request: Request) -> DataPlane:
    """The data plane, once the request's API key (if keys are configured) is accepted."""
    plane: DataPlane = request.app.state.worker.plane
    plane.authorize(bearer_key(request.headers.get("authorization", "").encode("latin-1")))
    return plane


PlaneDep = Annotated[DataPlane, Depends(get_plane)]
AuthorizedPlaneDep = Annotated[DataPlane, Depends(authorized_plane)]

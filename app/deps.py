"""Dependencies handed to FastAPI path operations, as `Annotated` aliases."""

from typing import Annotated

from fastapi import Depends, Request

from app.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI would run a plain `def` dependency in the threadpool, a hand-off per request.
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

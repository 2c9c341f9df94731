"""Dependencies handed to path operations; tests swap them through `app.dependency_overrides`."""

from typing import Annotated

from fastapi import Depends, Request

from app.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

"""Health probes: liveness (the process answers) and readiness (it can serve predictions)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import PlaneDep
from app.errors import ServeError

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live")
async def live() -> dict[str, str]:
    """200 while the process can answer."""
    return {"status": "alive"}


@router.get("/ready", responses={503: {"description": "not ready; `reason` says why"}})
async def ready(plane: PlaneDep) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 before that and while draining."""
    try:
        plane.check_ready()
    except ServeError as exc:  # the probes' own body shape
        return JSONResponse({"status": "unavailable", "reason": exc.message}, exc.status, exc.headers)
    return JSONResponse({"status": "ready"})

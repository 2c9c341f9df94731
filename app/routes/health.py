"""Health probes: liveness (the process answers) and readiness (it can serve predictions)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import RuntimeDep

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live")
async def live() -> dict[str, str]:
    """200 while the process can answer."""
    return {"status": "alive"}


@router.get("/ready", responses={503: {"description": "not ready; `reason` says why"}})
async def ready(runtime: RuntimeDep) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 before that and while draining."""
    health = runtime.health
    if health.is_ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse(
        {"status": "unavailable", "reason": health.reason}, status_code=503, headers={"Retry-After": "1"}
    )

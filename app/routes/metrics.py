"""GET /metrics: Prometheus text exposition."""

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import PlaneDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(plane: PlaneDep) -> Response:
    return Response(plane.metrics.render(), media_type=CONTENT_TYPE_LATEST)

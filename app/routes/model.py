"""GET /model: what is being served, from the checkpoint it came from."""

from typing import Any

from fastapi import APIRouter

from app.deps import AuthorizedPlaneDep

router = APIRouter(tags=["model"])


@router.get("/model")
def describe_model(plane: AuthorizedPlaneDep) -> dict[str, Any]:
    """Architecture, state_dict keys and shapes, classes, preprocessing, metrics and checkpoint facts."""
    return plane.current_model().describe()

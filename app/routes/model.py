"""GET /model: what is being served, from the checkpoint it came from."""

from typing import Any

from fastapi import APIRouter, Request

from app.deps import AuthorizedPlaneDep
from app.reload.snapshot import last_reload

router = APIRouter(tags=["model"])


@router.get("/model")
def describe_model(plane: AuthorizedPlaneDep, request: Request) -> dict[str, Any]:
    """The default model's default version (architecture, state_dict keys and shapes, classes,
    preprocessing, metrics and checkpoint facts), every model version served (`served`, with its
    state and resident memory), that model's `rollout` (its canary and shadow, null without one),
    the repository's `generation`, and the last SIGHUP reload's outcome (null before any, or
    without the supervisor)."""
    model = plane.current_model()
    rollout = plane.registry.rollouts.get(model.name)
    return {
        **model.describe(),
        "rollout": None if rollout is None else vars(rollout),
        "generation": plane.registry.generation,
        "served": [version.row() for version in plane.registry],
        "last_reload": last_reload(request.app.state.worker.handoff.snapshot),
    }

"""GET /: the page for people (app/static/page), served from the package like /docs."""

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.settings import STATIC_DIR

PAGE = STATIC_DIR / "page" / "index.html"
# The page loads only its own files and calls only this service: the browser enforces it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(PAGE, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

"""deploy/nginx/default.conf against docker-compose.yml's `lb` profile and the service's settings.
(scripts/container-check runs it for real: 3 replicas, load, one SIGKILLed, one SIGTERMed.)"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from app.settings import Settings
from bench.server import ROOT

CONF = (ROOT / "deploy" / "nginx" / "default.conf").read_text()
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
SECONDS = {"": 1, "s": 1, "m": 60}


def directive(name: str, text: str = CONF) -> str:
    """The argument of a directive that appears exactly once."""
    found = re.findall(rf"^\s*{name}\s+([^;]+);", text, re.MULTILINE)
    assert len(found) == 1, f"{name}: {found}"
    return str(found[0]).strip()


def size_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", value.lower()).groups()  # type: ignore[union-attr]
    return int(number) * UNITS[unit]


def seconds(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([sm]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * SECONDS[unit]


def block(name: str) -> str:
    match = re.search(rf"^{name}\s*\{{(.*?)^\}}", CONF, re.MULTILINE | re.DOTALL)
    assert match, name
    return match.group(1)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def lb_replicas(compose: dict[str, Any]) -> list[str]:
    return sorted(
        name
        for name, service in compose["services"].items()
        if "lb" in service.get("profiles", []) and name.startswith("api-")
    )


def test_the_upstream_lists_every_replica_service(compose: dict[str, Any]) -> None:
    replicas = lb_replicas(compose)
    assert replicas == ["api-1", "api-2", "api-3"]
    upstream = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", block("upstream fashion_serve"), re.MULTILINE)
    port = str(Settings().port)
    assert upstream == [(name, port) for name in replicas]
    for index, name in enumerate(replicas, start=1):
        assert re.search(
            rf"location = /replicas/{index}/metrics \{{\s*proxy_pass http://{name}:{port}/metrics;", CONF
        ), f"{name}'s /metrics"


def test_replicas_are_the_api_service_without_a_published_port(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    for name in lb_replicas(compose):
        replica = compose["services"][name]
        assert "ports" not in replica, "reached through nginx only"
        for key in ("image", "environment", "healthcheck", "read_only", "stop_grace_period"):
            assert replica[key] == api[key], (name, key)
    nginx = compose["services"]["nginx"]
    assert nginx["image"].startswith("nginx:")
    assert set(nginx["depends_on"]) == set(lb_replicas(compose))
    assert "./deploy/nginx/default.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]


def test_limits_agree_with_the_service() -> None:
    settings = Settings()
    server = block("server")
    assert size_bytes(directive("client_max_body_size", server)) == settings.max_upload_bytes
    assert seconds(directive("client_body_timeout", server)) == settings.body_timeout_s
    assert seconds(directive("client_header_timeout", server)) <= 10
    count, size = directive("large_client_header_buffers", server).split()
    assert int(count) >= 4 and size_bytes(size) >= 8 * 1024
    # nginx must drop an idle upstream connection before the replica does.
    assert seconds(directive("keepalive_timeout", block("upstream fashion_serve"))) < settings.keep_alive_s


def test_failed_requests_go_to_the_next_replica() -> None:
    upstream = block("upstream fashion_serve")
    assert int(directive("keepalive", upstream)) > 0
    assert directive("proxy_http_version") == "1.1"
    assert directive("proxy_set_header Connection") == '""'
    retry_on = set(directive("proxy_next_upstream").split())
    assert retry_on == {"error", "timeout", "http_502", "http_503", "non_idempotent"}
    assert int(directive("proxy_next_upstream_tries")) >= 2
    assert directive("proxy_request_buffering") == "on", "a body must be buffered to be sent again"

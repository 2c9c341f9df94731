"""A rollout walked end to end against `python -m app` (2 workers), printing each call and its
answer: a repository `fashion` with the first CNN (models/fashion_cnn_v1.pt) as version 1 and
CANDIDATE (default: the bundled default) as version 2 (policy: version 1 only), then load
version 2, shadow it at 100 %, read the agreement, canary it at 10 %, promote it, roll back,
unload it. Requests: Fashion-MNIST test images sent one at a time to `/predict`, each answer's
`X-Model-Version` counted.

    python -m bench.rollout_walk [CANDIDATE] [--images 1000]

The calls are the runbook's (docs/operations.md, "A rollout").
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.run import fashion_pngs
from bench.server import ROOT, serving

ADMIN_KEY = "walk-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
ROLLOUT = "/v2/repository/models/fashion/rollout"


def _call(port: int, method: str, path: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, ADMIN, method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def _versions(port: int, pngs: list[bytes]) -> dict[str, int]:
    """Which version answered each of `pngs`, sent one at a time to /predict."""
    boundary = "walkboundary"
    counted: collections.Counter[str] = collections.Counter()
    for png in pngs:
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
            + png
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", body, headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            counted[response.headers["X-Model-Version"]] += 1
    return dict(sorted(counted.items()))


def _step(title: str, answer: object) -> None:
    print(f"\n## {title}\n{json.dumps(answer)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout_walk", description=__doc__)
    parser.add_argument("candidate", type=Path, nargs="?", default=ROOT / "models" / "fashion_cnn.pt")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args(argv)
    pngs = fashion_pngs(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "repo" / "fashion"
        for version, checkpoint in (("1", ROOT / "models" / "fashion_cnn_v1.pt"), ("2", args.candidate)):
            (model / version).mkdir(parents=True)
            shutil.copy(checkpoint, model / version / "model.pt")
        (model / "config.json").write_text(json.dumps({"version_policy": {"specific": {"versions": [1]}}}))
        env = {
            "FASHION_SERVE_MODEL_REPOSITORY": str(model.parent),
            "FASHION_SERVE_ADMIN_KEYS": ADMIN_KEY,
            "FASHION_SERVE_LOG_LEVEL": "warning",
        }
        with serving(env, workers=2) as (_, port):
            _step("POST /v2/repository/index", _call(port, "POST", "/v2/repository/index", {}))
            began = time.perf_counter()
            load = {"parameters": {"version": "2"}}
            _step("load version 2", _call(port, "POST", "/v2/repository/models/fashion/load", load))
            print(f"(answered in {time.perf_counter() - began:.2f} s)")
            shadow = {"default_version": "1", "shadow": {"version": "2", "percent": 100}}
            _step("shadow version 2 at 100 %", _call(port, "PUT", ROLLOUT, shadow))
            print(f"{len(pngs)} requests answered by version: {_versions(port, pngs)}")
            time.sleep(0.5)  # the last shadow runs
            _step("GET rollout: the shadow's figures", _call(port, "GET", ROLLOUT))
            canary = {"shadow": None, "canary": {"version": "2", "percent": 10}}
            _step("canary version 2 at 10 %", _call(port, "PUT", ROLLOUT, canary))
            print(f"{len(pngs)} requests answered by version: {_versions(port, pngs)}")
            _step("promote version 2", _call(port, "PUT", ROLLOUT, {"canary": None, "default_version": "2"}))
            print(f"200 requests answered by version: {_versions(port, pngs[:200])}")
            _step("roll back to version 1", _call(port, "PUT", ROLLOUT, {"default_version": "1"}))
            print(f"200 requests answered by version: {_versions(port, pngs[:200])}")
            _step("unload version 2", _call(port, "POST", "/v2/repository/models/fashion/unload", load))
            _step("POST /v2/repository/index", _call(port, "POST", "/v2/repository/index", {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The model repository's costs, on 127.0.0.1: how long a version takes to load (validated, warm,
on every worker), whether idle models slow the default one, and whether loads and unloads
under load fail anything.

`python -m bench.repository` builds a repository (the default model, `fashion`, is the bundled
CNN; three more models are copies of the CNN and the course MLP), serves it with `python -m app`
(2 workers), and drives the default model's `/predict` at c=32 with wrk: alone, then with the
three others loaded and idle, alternating (`--rounds`). Then, with wrk running, it unloads and
loads a model, loads a broken version, and counts every answer that was not 200. Last, the rollout:
`/predict` at c=32 with no shadow, a 10 % and a 100 % shadow (`--candidate`, version 2), an overload
with a 100 % shadow (shadow runs dropped against users refused), and promote and roll back under
load. Stops by itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.run import drive, fashion_pngs, started, write_bodies
from bench.server import ROOT

ADMIN_KEY = "bench-admin"
OTHERS = ("cnn-b", "cnn-c", "mlp")


def _repository(root: Path, candidate: Path) -> None:
    """fashion (1: the bundled CNN; 2: the candidate, for the rollout rows), and three more models."""
    cnn, mlp = ROOT / "models" / "fashion_cnn.pt", ROOT / "models" / "course_network.pt"
    for name, version, source in (
        ("fashion", 1, cnn),
        ("fashion", 2, candidate),
        ("cnn-b", 1, cnn),
        ("cnn-c", 1, cnn),
        ("mlp", 1, mlp),
    ):
        (root / name / str(version)).mkdir(parents=True)
        shutil.copy(source, root / name / str(version) / "model.pt")
    config = {"version_policy": {"specific": {"versions": [1]}}, "default_version": "1"}
    (root / "fashion" / "config.json").write_text(json.dumps(config))


def _admin(port: int, verb: str, name: str, body: dict[str, object] | None = None) -> tuple[int, float]:
    """POST /v2/repository/models/NAME/VERB; (status, seconds until every worker served it)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/repository/models/{name}/{verb}",
        json.dumps(body or {}).encode(),
        {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
    )
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.repository", description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured time per row")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="alone / with three idle models, alternating")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--candidate", type=Path, default=ROOT / "models" / "fashion_cnn.pt", help="version 2 of the default model"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root, bodies = Path(tmp) / "repo", Path(tmp) / "bodies"
        _repository(root, args.candidate)
        bodies.mkdir()
        content_type = write_bodies(bodies, fashion_pngs(256), 1)
        env = {
            "FASHION_SERVE_MODEL_REPOSITORY": str(root),
            "FASHION_SERVE_DEFAULT_MODEL": "fashion",
            "FASHION_SERVE_LOAD_MODELS": "fashion",
            "FASHION_SERVE_ADMIN_KEYS": ADMIN_KEY,
        }
        with started("service", ROOT / "models" / "fashion_cnn.pt", args.workers, extra_env=env) as server:
            print(f"ready in {server.ready_s:.2f} s with the default model alone ({args.workers} workers)")
            rates: dict[str, list[float]] = {"alone": [], "with 3 idle": []}
            loads: list[float] = []
            for _ in range(args.rounds):
                row = drive(server, bodies, content_type, 32, args.seconds, args.warmup)
                rates["alone"].append(row["rps"])
                print(f"  alone        {row['rps']:8.0f} req/s  p99 {row['p99']:6.2f} ms  errors {row['errors']}")
                for name in OTHERS:
                    status, seconds = _admin(server.port, "load", name)
                    assert status == 200, f"load {name}: {status}"
                    loads.append(seconds)
                row = drive(server, bodies, content_type, 32, args.seconds, args.warmup)
                rates["with 3 idle"].append(row["rps"])
                print(f"  with 3 idle  {row['rps']:8.0f} req/s  p99 {row['p99']:6.2f} ms  errors {row['errors']}")
                for name in OTHERS:
                    _admin(server.port, "unload", name)
            alone, beside = statistics.median(rates["alone"]), statistics.median(rates["with 3 idle"])
            print(f"/predict c=32, median of {args.rounds}: with three idle models {beside / alone:.3f}x alone")
            print(
                f"load of one version (validated, warm, on every worker): median {statistics.median(loads):.2f} s, "
                f"max {max(loads):.2f} s over {len(loads)} loads"
            )
            _under_load(server, bodies, content_type, root, args)
            _rollout(server, bodies, content_type, args)
    return 0


def _under_load(server: object, bodies: Path, content_type: str, root: Path, args: argparse.Namespace) -> None:
    """wrk at c=32 on the default model while another model is unloaded, loaded, and given a broken version."""
    (root / "mlp" / "2").mkdir()
    (root / "mlp" / "2" / "model.pt").write_bytes(b"not a checkpoint")
    outcome: dict[str, dict] = {}
    load = threading.Thread(
        target=lambda: outcome.setdefault("row", drive(server, bodies, content_type, 32, 3 * args.seconds, 1.0))  # type: ignore[arg-type]
    )
    load.start()
    time.sleep(1.0)
    port = server.port  # type: ignore[attr-defined]
    steps = [
        ("load mlp", _admin(port, "load", "mlp", {"parameters": {"version": "1"}})),
        ("unload mlp", _admin(port, "unload", "mlp")),
        ("load cnn-b", _admin(port, "load", "cnn-b")),
        ("load mlp v2 (broken)", _admin(port, "load", "mlp", {"parameters": {"version": "2"}})),
        ("unload cnn-b", _admin(port, "unload", "cnn-b")),
    ]
    load.join()
    row = outcome["row"]
    print("under /predict c=32 load: " + ", ".join(f"{name} -> {status} in {s:.2f} s" for name, (status, s) in steps))
    print(f"  {row['rps']:.0f} req/s, {row['summary']['requests']} requests, {row['errors']} not answered 200")


def _put_rollout(port: int, body: dict[str, object]) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/repository/models/fashion/rollout",
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return int(response.status)


def _counters(port: int, *names: str) -> dict[str, float]:
    """The sums of the named counters in /metrics (all label sets)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    sums = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        for name in names:
            if line.startswith(name) and not line.startswith("#"):
                sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def _rollout(server: object, bodies: Path, content_type: str, args: argparse.Namespace) -> None:
    """The default model's /predict at c=32 with no shadow, a 10 % and a 100 % shadow (alternating),
    then an overload (c=1024) with a 100 % shadow: shadow runs dropped against users refused; then
    promote and roll back under c=32 load."""
    port = server.port  # type: ignore[attr-defined]
    status, _ = _admin(port, "load", "fashion", {"parameters": {"version": "2"}})
    assert status == 200, status
    _put_rollout(port, {"default_version": "1"})
    rows: dict[str, list[dict]] = {"no shadow": [], "10 % shadow": [], "100 % shadow": []}
    settings = {"no shadow": None, "10 % shadow": 10, "100 % shadow": 100}
    for _ in range(args.rounds):
        for label, percent in settings.items():
            _put_rollout(port, {"shadow": None if percent is None else {"version": "2", "percent": percent}})
            rows[label].append(drive(server, bodies, content_type, 32, args.seconds, args.warmup))  # type: ignore[arg-type]
    base = statistics.median(r["rps"] for r in rows["no shadow"])
    base_p99 = statistics.median(r["p99"] for r in rows["no shadow"])
    for label, measured in rows.items():
        rps, p99 = statistics.median(r["rps"] for r in measured), statistics.median(r["p99"] for r in measured)
        errors = sum(r["errors"] for r in measured)
        print(
            f"  {label:<13} {rps:8.0f} req/s ({rps / base:.3f}x)  p99 {p99:6.2f} ms ({p99 / base_p99:.2f}x)  "
            f"errors {errors}"
        )
    names = ("fashion_serve_rollout_dropped_total", "fashion_serve_refused_requests_total")
    before = _counters(port, *names)
    row = drive(server, bodies, content_type, 1024, args.seconds, 1.0, timeout="30s", statuses=True)  # type: ignore[arg-type]
    after = _counters(port, *names)
    dropped, refused = (after[n] - before[n] for n in names)
    print(
        f"overload, c=1024 with a 100 % shadow: {row['rps']:.0f} req/s, {refused:.0f} user requests refused, "
        f"{dropped:.0f} shadow runs dropped, statuses {row['summary'].get('statuses')}"
    )
    _put_rollout(port, {"shadow": None})
    outcome: dict[str, dict] = {}
    load = threading.Thread(
        target=lambda: outcome.setdefault("row", drive(server, bodies, content_type, 32, 2 * args.seconds, 1.0))  # type: ignore[arg-type]
    )
    load.start()
    time.sleep(1.0)
    switches = []
    for version in ("2", "1", "2", "1"):
        began = time.perf_counter()
        _put_rollout(port, {"default_version": version})
        switches.append(time.perf_counter() - began)
        time.sleep(0.5)
    load.join()
    row = outcome["row"]
    print(
        f"promote and roll back twice under c=32: each PUT answered in {max(switches):.2f} s at most; "
        f"{row['summary']['requests']} requests, {row['errors']} not answered 200"
    )


if __name__ == "__main__":
    raise SystemExit(main())

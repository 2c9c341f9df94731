"""The real process: start-up failures, and SIGTERM with a request in flight."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.server import ROOT, serving, start_server, wait_ready
from tests.helpers import ESTABLISHED, LISTEN, png, sockets_by_process, workers_of, write_tiny_checkpoint


def _fails_to_start(checkpoint: Path, workers: int | None = None) -> str:
    process, _ = start_server({"FASHION_SERVE_CHECKPOINT": str(checkpoint)}, workers=workers)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    critical = [line for line in output.splitlines() if "CRITICAL" in line]
    assert len(critical) == 1, output
    assert "Traceback" not in output, output
    return critical[0]


def test_missing_checkpoint_exits_nonzero_with_one_clear_line(tmp_path: Path) -> None:
    line = _fails_to_start(tmp_path / "missing.pt")
    assert f"cannot start: checkpoint {tmp_path / 'missing.pt'}" in line and "does not exist" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path: Path, workers: str) -> None:
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self) -> tuple[object, ...]:
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"format_version": 1, "payload": RunsCode()}, tmp_path / "evil.pt")
    line = _fails_to_start(tmp_path / "evil.pt", workers=int(workers))
    assert "pickled Python objects" in line
    assert not marker.exists()


def test_truncated_checkpoint_exits_nonzero(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[:500])
    assert "truncated or corrupt" in _fails_to_start(path)


def test_mismatched_and_corrupt_checkpoints_exit_nonzero(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["output.weight"] = torch.zeros(10, 99)
    torch.save(raw, tmp_path / "mismatched.pt")
    assert "has shape (10, 99), the architecture needs (10, 16)" in _fails_to_start(tmp_path / "mismatched.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage, not a checkpoint")
    assert "not a PyTorch checkpoint" in _fails_to_start(tmp_path / "corrupt.pt")


def _read_response(conn: socket.socket) -> tuple[int, str]:
    """Status and body of one HTTP response, however the server splits it into segments."""
    response = http.client.HTTPResponse(conn)
    response.begin()
    return response.status, response.read().decode()


def _multipart(data: bytes) -> tuple[bytes, bytes]:
    boundary = b"testboundary42"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--" + boundary + b"--\r\n"
    )
    return body, b"multipart/form-data; boundary=" + boundary


def test_sigterm_under_load_loses_no_request_and_exits_cleanly(tmp_path: Path) -> None:
    """20 uploads are mid-body when SIGTERM arrives: every one is answered 200, then exit 0 in the grace."""
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    process, port = start_server({"FASHION_SERVE_CHECKPOINT": str(checkpoint), "FASHION_SERVE_SHUTDOWN_GRACE_S": "5"})
    connections: list[socket.socket] = []
    try:
        wait_ready(process, port)
        body, content_type = _multipart(png())
        for i in range(20):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sendall(
                b"POST /predict?k=1 HTTP/1.1\r\nHost: test\r\nContent-Type: " + content_type + b"\r\n"
                b"Content-Length: "
                + str(len(body)).encode()
                + b"\r\nX-Request-ID: in-flight-%d\r\n\r\n" % i
                + body[:40]
            )  # the request is in progress...
            connections.append(conn)
        time.sleep(0.3)
        sent_at = time.monotonic()
        process.send_signal(signal.SIGTERM)  # ...when the orchestrator stops the container
        time.sleep(0.3)
        for conn in connections:
            conn.sendall(body[40:])
        answers = [_read_response(conn) for conn in connections]
        assert [status for status, _ in answers] == [200] * 20, answers
        assert all('"top_k"' in text for _, text in answers)
        output, _ = process.communicate(timeout=10)
        assert process.returncode == 0
        assert time.monotonic() - sent_at < 5 + 2
        assert "SIGTERM: readiness off" in output
        assert all(f"[in-flight-{i}] POST /predict 200" in output for i in range(20))
    finally:
        for conn in connections:
            conn.close()
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_every_access_line_is_written_by_the_time_the_workers_exit(tmp_path: Path) -> None:
    """Lines are written together, not one per request: none may be held back when a worker exits."""
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    process, port = start_server({"FASHION_SERVE_CHECKPOINT": str(checkpoint)}, workers=2)
    try:
        wait_ready(process, port)
        body, content_type = _multipart(png())
        for i in range(150):  # a new connection each: both workers answer some
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            headers = {"Content-Type": content_type.decode(), "X-Request-ID": f"line-{i}"}
            connection.request("POST", "/predict", body, headers)
            assert connection.getresponse().status == 200
            connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    missing = [i for i in range(150) if f"[line-{i}] POST /predict 200" not in output]
    assert not missing, f"{len(missing)} access lines lost, e.g. {missing[:5]}"


def test_a_slow_body_gets_408_and_the_service_stays_ready(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    env = {"FASHION_SERVE_CHECKPOINT": str(checkpoint), "FASHION_SERVE_BODY_TIMEOUT_S": "1"}
    with serving(env) as (process, port):
        body, content_type = _multipart(png())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(
                b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: " + content_type + b"\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:40]
            )
            status, text = _read_response(conn)  # the client never sends the rest
        assert status == 408, text
        assert "not received within 1 s" in text
        wait_ready(process, port, timeout=5)


def test_json_logs(tmp_path: Path) -> None:
    import json

    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    process, port = start_server({"FASHION_SERVE_CHECKPOINT": str(checkpoint), "FASHION_SERVE_LOG_FORMAT": "json"})
    try:
        wait_ready(process, port)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(r["message"].startswith("ready: m (network") for r in records)
    assert any(r["message"].startswith("GET /health/ready 200") and len(r["request_id"]) == 32 for r in records)
    assert all({"time", "level", "logger", "request_id", "message"} <= set(r) for r in records)
    assert process.returncode == 0
    assert not [line for line in output.splitlines() if line.strip() and not line.startswith("{")], output


def test_a_killed_worker_is_replaced_and_service_goes_on(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    process, port = start_server({"FASHION_SERVE_CHECKPOINT": str(checkpoint)}, workers=2)
    try:
        wait_ready(process, port)
        deadline = time.monotonic() + 30
        while len(workers := set(workers_of(process.pid))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)  # e.g. the kernel's OOM killer
        while (len(replaced := set(workers_of(process.pid))) < 2 or victim in replaced) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert victim not in replaced and len(replaced) == 2
        body, content_type = _multipart(png())
        for _ in range(10):  # whichever worker answers, each one is ready and predicts
            wait_ready(process, port, timeout=10)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(
                    b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: " + content_type + b"\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                assert _read_response(conn)[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    assert process.returncode == 0, output
    assert f"Worker (pid:{victim}) was sent SIGKILL" in output, output


def _start_on_a_taken_port(checkpoint: Path, port: int) -> subprocess.CompletedProcess[str]:
    """`python -m app` on a port something already holds: it must refuse, not join."""
    return subprocess.run(
        [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, "FASHION_SERVE_CHECKPOINT": str(checkpoint), "FASHION_SERVE_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_address_in_use_is_one_clear_line(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = _start_on_a_taken_port(checkpoint, port)
    assert process.returncode == 1
    critical = [line for line in process.stderr.splitlines() if "CRITICAL" in line]
    assert critical == [line for line in process.stderr.splitlines() if line.strip()], process.stderr
    assert f"cannot start: 127.0.0.1:{port}: Address already in use" in critical[0]


def test_connections_are_spread_over_the_workers(tmp_path: Path) -> None:
    """Found in benchmarking: with one shared listening socket, the first worker to wake took
    most of a burst of new keep-alive connections (32 of 32) and the other worker idled."""
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    with serving({"FASHION_SERVE_CHECKPOINT": str(checkpoint)}, workers=2) as (process, port):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # both workers listening: each answers ready
            time.sleep(0.2)
            listening = sockets_by_process(workers_of(process.pid), port, LISTEN)
            if len(listening) == 2 and all(listening.values()):
                break
        connections = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(32)]
        try:
            for conn in connections:  # one request each, so every connection has been accepted
                conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
                assert _read_response(conn)[0] == 200
            counts = sockets_by_process(workers_of(process.pid), port, ESTABLISHED)
        finally:
            for conn in connections:
                conn.close()
    assert sum(counts.values()) == 32
    assert min(counts.values()) >= 4, counts  # an even split has 16 each; <= 3 has p ~ 1e-6


def test_sigint_to_the_supervisor_drains_like_sigterm(tmp_path: Path) -> None:
    """Found in review: gunicorn turned SIGINT into SIGQUIT for the workers, which uvicorn workers
    ignore, so they were killed after the grace period instead of finishing their requests."""
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    process, port = start_server({"FASHION_SERVE_CHECKPOINT": str(checkpoint)}, workers=2)
    try:
        wait_ready(process, port)
        body, content_type = _multipart(png())
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: " + content_type + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:40]
        )
        time.sleep(0.3)
        sent_at = time.monotonic()
        process.send_signal(signal.SIGINT)  # to the supervisor only, as `docker run` forwards Ctrl-C
        time.sleep(0.3)
        conn.sendall(body[40:])
        assert _read_response(conn)[0] == 200
        conn.close()
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert time.monotonic() - sent_at < 5, output  # drained, not killed after the 8 s grace
    assert "SIGKILL" not in output and output.count("Application shutdown complete") == 2, output


def test_a_second_server_on_the_same_port_is_refused(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    with serving({"FASHION_SERVE_CHECKPOINT": str(checkpoint)}, workers=2) as (first, port):
        second = _start_on_a_taken_port(checkpoint, port)
        assert second.returncode == 1
        assert f"cannot start: 127.0.0.1:{port}: Address already in use" in second.stderr
        wait_ready(first, port, timeout=5)


def test_the_metrics_directory_lives_as_long_as_the_supervisor(tmp_path: Path) -> None:
    """Found in review: it was never removed. It must outlive any one worker."""
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"FASHION_SERVE_CHECKPOINT": str(checkpoint), "TMPDIR": str(scratch)}
    process, port = start_server(env, workers=2)
    try:
        wait_ready(process, port)
        [metrics_dir] = scratch.glob("fashion-serve-metrics-*")
        deadline = time.monotonic() + 30
        while len(workers := set(workers_of(process.pid))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(min(workers), signal.SIGTERM)  # one worker exits cleanly and is replaced
        while (len(now := set(workers_of(process.pid))) < 2 or min(workers) in now) and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_ready(process, port)
        assert metrics_dir.is_dir()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    assert process.returncode == 0, output
    assert not list(scratch.glob("fashion-serve-metrics-*"))

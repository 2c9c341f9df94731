"""A closed-loop load generator for the v2 protocol over gRPC (wrk speaks no gRPC): `connections`
callers, each on its own channel and so its own TCP connection (as wrk's connections, spread
over the workers by SO_REUSEPORT), each sending ModelInfer again as soon as the answer arrives.
The requests carry the same raw FP32 tensors as the REST v2 rows (their bodies' binary part).
It is Python (grpc.aio, one thread), heavier than wrk: its CPU use is reported beside the rows."""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import grpc

from app.protocols.grpc.proto import grpc_predict_v2_pb2 as pb
from app.protocols.grpc.proto import grpc_predict_v2_pb2_grpc as pb_grpc


def requests_from_v2_bodies(bodies: Path, model: str, per_request: int) -> list[Any]:
    """ModelInferRequests with raw_input_contents: the FP32 tensors of the REST v2 bodies."""
    messages = []
    for i in range(int((bodies / "count").read_text())):
        body = (bodies / f"body_{i}.bin").read_bytes()
        header_length = int((bodies / f"body_{i}.len").read_text())
        message = pb.ModelInferRequest(model_name=model)
        message.inputs.add(name="input", datatype="FP32", shape=[per_request, 1, 28, 28])
        message.raw_input_contents.append(body[header_length:])
        messages.append(message)
    return messages


async def _load(target: str, messages: list[Any], connections: int, seconds: float, warmup: float) -> dict:
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel, not one shared
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
    latencies: list[float] = []
    errors = 0
    measuring_from = time.perf_counter() + warmup
    stop_at = measuring_from + seconds

    async def caller(index: int) -> None:
        nonlocal errors
        k = index
        while (began := time.perf_counter()) < stop_at:
            try:
                await stubs[index].ModelInfer(messages[k % len(messages)], timeout=10)
            except grpc.aio.AioRpcError:
                errors += began >= measuring_from
            else:
                if began >= measuring_from:
                    latencies.append(time.perf_counter() - began)
            k += 1

    await asyncio.sleep(0)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(caller(i) for i in range(connections)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    for channel in channels:
        await channel.close()
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [float("nan")] * 99
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50": quantiles[49] * 1000,
        "p90": quantiles[89] * 1000,
        "p99": quantiles[98] * 1000,
        "client_cpu_s": (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime),
    }


def load(port: int, messages: list[Any], connections: int, seconds: float, warmup: float) -> dict:
    """Run the load; requests, errors, p50/p90/p99 ms of the measured `seconds`, and the client's
    CPU seconds over warm-up and measurement."""
    return asyncio.run(_load(f"127.0.0.1:{port}", messages, connections, seconds, warmup))


def load_h2(port: int, message: Any, connections: int, seconds: float, warmup: float) -> dict:
    """The same closed loop driven by h2load (Debian's `nghttp2-client`, C, like wrk): one
    ModelInfer message in gRPC's framing, `connections` connections with one call in flight each.
    h2load reads neither gRPC trailers nor percentiles: an answer counts as served only if it
    carried response data (a refused call is trailers-only), and the latency is its mean."""
    import re
    import struct
    import subprocess
    import tempfile

    data = message.SerializeToString()
    with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
        body.write(b"\0" + struct.pack(">I", len(data)) + data)
        body.flush()
        command = [
            "h2load", "-c", str(connections), "-m", "1", "-d", body.name, "-H", "content-type: application/grpc",
            "-H", "te: trailers", f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer",
        ]  # fmt: skip
        # A warm-up run of its own, as `drive` gives wrk: h2load's --warm-up-time left the first
        # measured seconds of a new server at half its rate.
        subprocess.run([*command, "-D", str(max(1, round(warmup)))], capture_output=True, check=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([*command, "-D", str(round(seconds))], capture_output=True, text=True, check=True).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", out)
    traffic = re.search(r"traffic: .*\((\d+)\) data", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if done is None or traffic is None or mean is None:
        raise RuntimeError(f"h2load's output was not understood: {out[-400:]}")
    requests, succeeded = int(done.group(1)), int(done.group(2))
    answered = succeeded if int(traffic.group(1)) >= 64 * max(1, succeeded) else 0  # data in every answer
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}[re.sub(r"[\d.]", "", mean.group(1))]
    return {
        "requests": answered,
        "errors": requests - answered,
        "p50": float(re.sub(r"[a-z]", "", mean.group(1))) * unit,
        "p90": float("nan"),
        "p99": float("nan"),
        "client_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }

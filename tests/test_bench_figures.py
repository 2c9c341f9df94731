"""The benchmark's server figures (bench.run.Server): CPU seconds and resident memory of the server
and every worker under it, read through psutil; and the order its rounds run the settings in."""

from __future__ import annotations

import subprocess
import sys

from bench.run import Server, rotated

WORKER = """
import time
block = bytearray(64 * 2**20)  # resident: written below
for i in range(0, len(block), 4096):
    block[i] = 1
while time.process_time() < 0.5:
    pass
print("ready", flush=True)
time.sleep(60)
"""
SUPERVISOR = f"""
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", {WORKER!r}], stdout=sys.stdout)
worker.wait()
"""


def test_cpu_and_memory_count_the_workers_under_the_server() -> None:
    process = subprocess.Popen([sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        server = Server("test", process, port=0, ready_s=0.0)
        assert len(server.processes()) == 2
        assert server.cpu_seconds() >= 0.5, "the worker's CPU is counted"
        assert server.rss_mb_per_worker() >= 64, "the worker's memory, not only the supervisor's"
    finally:
        for child in Server("test", process, 0, 0.0).processes()[1:]:
            child.kill()
        process.kill()
        process.wait()


def test_each_round_starts_with_the_next_setting() -> None:
    """No setting keeps one seat: over as many rounds as settings, each runs first once and each
    pair still runs within every round."""
    settings = ["off", "on", "control"]
    rounds = [rotated(settings, r) for r in range(6)]
    assert rounds[:3] == [["off", "on", "control"], ["on", "control", "off"], ["control", "off", "on"]]
    assert rounds[3:] == rounds[:3]
    assert all(sorted(order) == sorted(settings) for order in rounds)
    assert rotated([], 3) == []

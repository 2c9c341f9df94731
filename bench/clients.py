"""Keep-alive HTTP clients on 127.0.0.1 that account for every request: each client sends its
requests in turn, one at a time, and stops only after the one in flight is answered."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

Request = tuple[str, str, bytes, dict[str, str]]  # method, path, body, headers


class KeepAliveLoad:
    """`clients` threads, each with its own connection; client i cycles through `requests_of(i)`
    until `stop()`. `outcomes` counts answers by status and connection errors by exception name."""

    def __init__(self, port: int, clients: int, requests_of: Callable[[int], Sequence[Request]]) -> None:
        self.port = port
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(requests_of(i),), daemon=True) for i in range(clients)
        ]

    def start(self) -> KeepAliveLoad:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(60)

    @property
    def failed(self) -> int:
        return sum(n for outcome, n in self.outcomes.items() if not outcome.startswith("2"))

    def _client(self, requests: Sequence[Request]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = 0
        while not self._stopping.is_set():
            method, path, body, headers = requests[sent % len(requests)]
            start = time.perf_counter()
            try:
                connection.request(method, path, body, headers)
                response = connection.getresponse()
                response.read()
                outcome = str(response.status)
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            with self._lock:
                self.outcomes[outcome] += 1
                self.latencies.append(time.perf_counter() - start)
            sent += 1
        connection.close()

"""Poll a server's /health for a while and print the latencies, from a process of its own.

`python health_probe.py URL SECONDS [HEADER=VALUE ...]`: prints `ready` once its connection
is open, then polls /health for SECONDS and prints the latencies (seconds) as one JSON list.
A process of its own, so that the client work of a flood sent from the test's process
(encoding, parsing, its threads' turns at the GIL) is not counted as the server's latency.
"""

from __future__ import annotations

import json
import sys
import time

import httpx


def main() -> None:
    url, seconds = sys.argv[1], float(sys.argv[2])
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        print("ready", flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            answer = http.get("/health")
            latencies.append(time.perf_counter() - started)
            if answer.status_code != 200:
                print(json.dumps({"error": answer.status_code}), flush=True)
                return
            time.sleep(0.002)
    print(json.dumps(latencies), flush=True)


if __name__ == "__main__":
    main()

"""A load generator in its own process: GetState reads at a fixed rate, open loop.

    python bench/_loadgen.py          # then, on stdin, one command a line:
    start TARGET RATE VIEW            # reads/s; VIEW: the GetStateRequest.view number (0: none)
    stop                              # answers one JSON line: what was sent and answered

Open loop: each read is sent at its scheduled time (start + n / RATE), whether or not the
earlier ones were answered, as independent clients would; a generator that falls behind sends
at once to catch up. At most MAX_IN_FLIGHT reads are outstanding: beyond that a scheduled
read is counted in `skipped`, not sent. Answers are not deserialized (raw bytes), so the
generator's own CPU is mostly gRPC's. `answered_per_s` is what the server actually served.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import threading
import time
from typing import Any

import grpc

from lrctl.v1 import training_control_pb2 as pb

GET_STATE = "/lrctl.v1.TrainingControlService/GetState"
MAX_IN_FLIGHT = 500


async def generate(target: str, rate: float, request: bytes, ready: threading.Event,
                   stop: threading.Event) -> dict[str, Any]:
    codes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    in_flight: set[asyncio.Task[None]] = set()
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(GET_STATE)  # bytes in, bytes out
        await call(request, timeout=30)  # connected before the clock starts
        ready.set()

        async def one() -> None:
            begin = time.perf_counter()
            try:
                await call(request, timeout=30)
                codes["OK"] += 1
                latencies.append(time.perf_counter() - begin)
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1

        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = skipped = 0
        while not stop.is_set():
            delay = start + (sent + skipped) / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= MAX_IN_FLIGHT:
                skipped += 1
                continue
            task = asyncio.create_task(one())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
        seconds = loop.time() - start
        if in_flight:
            await asyncio.wait(in_flight, timeout=30)
    latencies.sort()

    def ms(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3, 3) if latencies else None

    return {"rate": rate, "seconds": round(seconds, 3), "sent": sent, "skipped": skipped, "codes": dict(codes),
            "answered_per_s": round(codes["OK"] / seconds, 1) if seconds > 0 else 0.0,
            "p50_ms": ms(0.5), "p99_ms": ms(0.99)}


def main() -> None:
    stop = threading.Event()
    outcome: list[dict[str, Any]] = []
    runner: threading.Thread | None = None
    for line in sys.stdin:
        command, *fields = line.split()
        if command == "start":
            target, rate, view = fields[0], float(fields[1]), int(fields[2])
            request = pb.GetStateRequest(view=view).SerializeToString()  # type: ignore[arg-type]
            stop.clear()
            outcome.clear()
            ready = threading.Event()

            def run(target: str = target, rate: float = rate, request: bytes = request,
                    ready: threading.Event = ready) -> None:
                try:
                    outcome.append(asyncio.run(generate(target, rate, request, ready, stop)))
                finally:
                    ready.set()

            runner = threading.Thread(target=run, daemon=True)
            runner.start()
            ready.wait()
            print("STARTED", flush=True)
        elif command == "stop" and runner is not None:
            stop.set()
            runner.join()
            print(json.dumps(outcome[0] if outcome else {"error": "the generator failed"}), flush=True)


if __name__ == "__main__":
    main()

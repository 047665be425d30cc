"""The embedded gRPC server: lrctl's service, standard health checking and reflection.

`serve()` is a context manager yielding `(server, port)`; pass port 0 to let the OS choose.
Health follows the run: SERVING while training, NOT_SERVING otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lrctl.service.controller import Controller, Phase
from lrctl.service.servicer import TrainingControlServicer
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingControlService"].full_name
logger = logging.getLogger("lrctl.server")


def _follow_phase(controller: Controller, servicer: health.HealthServicer, stop: threading.Event) -> None:
    """Keep health in step with the run's phase (a watcher like any other client's)."""
    for snap in controller.updates(min_interval=3600.0, is_active=lambda: not stop.is_set()):
        status = (health_pb2.HealthCheckResponse.SERVING if snap.phase is Phase.TRAINING
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SERVICE_NAME):
            servicer.set(service, status)


@contextlib.contextmanager
def serve(controller: Controller, address: str = DEFAULT_ADDRESS, *,
          max_workers: int = 32) -> Iterator[tuple[grpc.Server, int]]:
    """Run the server on a background thread pool for the duration of the `with` block.

    Each WatchState stream and each `wait_until_applied` call holds one worker thread while
    it lasts, hence a pool larger than gRPC's usual default.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers, thread_name_prefix="lrctl-grpc"))
    pb_grpc.add_TrainingControlServiceServicer_to_server(TrainingControlServicer(controller), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    server.start()
    stop = threading.Event()
    follower = threading.Thread(target=_follow_phase, args=(controller, health_servicer, stop),
                                name="lrctl-health", daemon=True)
    follower.start()
    logger.info("lrctl listening on %s (port %d)", address, port)
    try:
        yield server, port
    finally:
        stop.set()
        health_servicer.enter_graceful_shutdown()
        server.stop(grace=1.0).wait()
        follower.join(timeout=2.0)

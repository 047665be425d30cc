# The trainer image: TensorFlow's CUDA build plus lrctl, serving the control API over TLS on
# :50051 and plaintext health checks alone on :50052.
#   openssl rand -hex 32 > token
#   mkdir tls && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
#     -subj /CN=lrctl -addext subjectAltName=DNS:lrctl,DNS:localhost,IP:127.0.0.1 \
#     -keyout tls/tls.key -out tls/tls.crt
#   docker build -t lrctl:0.1.0 . && docker run --gpus all -p 50051:50051 \
#     -v "$PWD/token:/run/secrets/lrctl-token:ro" -v "$PWD/tls:/run/secrets/lrctl-tls:ro" lrctl:0.1.0
#   LRCTL_TOKEN=$(cat token) lrctl --target localhost:50051 --ca tls/tls.crt state
# Runs the demo by default; pass `--model MODULE:FUNCTION ...` to train your own model (see
# README, "Container and Kubernetes"). It listens beyond loopback, so it needs the mounted
# token (lrctl-trainer refuses to start otherwise); TLS keeps the token off the wire. The
# health port tells only SERVING or not: kubelet's native gRPC probes cannot speak TLS. No
# Docker engine in CI: hadolint and tests/test_deploy.py check this file statically,
# including that this tag matches the tensorflow pin in pyproject.toml and
# docker/constraints.txt.
FROM tensorflow/tensorflow:2.21.0-gpu

# TF_CPP_MIN_LOG_LEVEL=2: TensorFlow's C++ INFO and WARNING lines off (errors stay).
ENV TF_CPP_MIN_LOG_LEVEL=2 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/lrctl
# Dependencies first, pinned to the versions CI tested (docker/gen_constraints.py), so a
# source change does not reinstall them. PIP_BREAK_SYSTEM_PACKAGES: the base image's Python is
# the system one; this image is the only user of it.
COPY docker/constraints.txt docker/constraints.txt
COPY pyproject.toml README.md buf.yaml ./
COPY protos protos
COPY client client
COPY service service
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install \
        --constraint docker/constraints.txt ".[service]" \
    && python3 -c "import lrctl.service.rpc.server, keras, tensorflow"

# A fixed numeric non-root user, so Kubernetes' runAsNonRoot can verify it.
RUN useradd --no-log-init --uid 10001 --user-group --create-home --shell /usr/sbin/nologin lrctl
USER 10001:10001

EXPOSE 50051 50052
# Liveness service "" on the plaintext health port: SERVING as soon as the server is up.
# TensorFlow's import and CUDA start-up take tens of seconds, so failures in the first two
# minutes do not count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["lrctl", "--target", "127.0.0.1:50052", "--timeout", "5", "health", "--service", ""]
# --verbose 2: one line per epoch, not Keras's progress bar (unreadable in container logs).
ENTRYPOINT ["lrctl-trainer", "--listen", "0.0.0.0:50051", "--token-file", "/run/secrets/lrctl-token", \
            "--tls-cert", "/run/secrets/lrctl-tls/tls.crt", "--tls-key", "/run/secrets/lrctl-tls/tls.key", \
            "--health-listen", "0.0.0.0:50052", "--verbose", "2"]
CMD ["--demo"]

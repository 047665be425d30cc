# The trainer image: TensorFlow's CUDA build plus lrctl, serving the control API on :50051.
#   openssl rand -hex 32 > token
#   docker build -t lrctl . && docker run --gpus all -p 50051:50051 \
#     -v "$PWD/token:/run/secrets/lrctl-token:ro" lrctl
#   LRCTL_TOKEN=$(cat token) lrctl state
# Runs the demo by default; pass `--model MODULE:FUNCTION ...` to train your own model. It
# listens beyond loopback, so it needs the mounted token (lrctl-trainer refuses otherwise).
# (Not yet built in CI: no Docker engine there. Hardening and k8s manifests are on the roadmap.)
FROM tensorflow/tensorflow:2.21.0-gpu

WORKDIR /opt/lrctl
COPY pyproject.toml README.md buf.yaml ./
COPY protos protos
COPY client client
COPY service service
RUN python3 -m pip install --no-cache-dir ".[service]"

EXPOSE 50051
ENTRYPOINT ["lrctl-trainer", "--listen", "0.0.0.0:50051", "--token-file", "/run/secrets/lrctl-token"]
CMD ["--demo"]

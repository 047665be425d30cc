"""The container image and the Kubernetes manifests, checked statically (no Docker engine or
cluster in CI): hadolint on the Dockerfile, the TensorFlow pin in the base image tag against
pyproject.toml and docker/constraints.txt, and every field in deploy/k8s/ that has to agree
with the image (port, token path, user, probes, health service names)."""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lrctl.client import cli
from lrctl.service.apps import trainer_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest brings tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
K8S = ROOT / "deploy" / "k8s"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVICE_NAME = "lrctl.v1.TrainingControlService"
# Trainer flags the Job uses that other parts of issue 8 are adding (checkpoints, metrics).
PENDING_FLAGS = {"--checkpoint-dir", "--checkpoint-every", "--metrics-listen", "--tensorboard-dir"}


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments): continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def _one(keyword: str) -> str:
    found = [rest for kw, rest in _instructions() if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the Dockerfile, found {len(found)}"
    return found[0]


def _exec_form(keyword: str) -> list[str]:
    value = json.loads(_one(keyword))
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), keyword
    return value


def _flag(argv: list[str], name: str) -> str:
    """The value of `--name VALUE` or `--name=VALUE` in argv (the last one wins, as argparse)."""
    values = [b for a, b in itertools.pairwise(argv) if a == name]
    values += [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert values, f"{name} missing from {argv}"
    return values[-1]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/k8s/*.yaml, by kind (each kind once)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert doc["kind"] not in objects, f"a second {doc['kind']} in {path.name}"
            objects[doc["kind"]] = doc
    return objects


def _container() -> dict[str, Any]:
    containers = _manifests()["Job"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# --- Dockerfile ---


def test_hadolint_passes() -> None:
    exe = Path(sys.executable).with_name("hadolint")
    binary = str(exe) if exe.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.skip('hadolint is not installed (it comes with pip install -e ".[dev]")')
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_tag_matches_the_pinned_tensorflow() -> None:
    match = re.fullmatch(r"tensorflow/tensorflow:(\d+\.\d+\.\d+)-gpu", _one("FROM"))
    assert match, f"FROM must be the official TensorFlow GPU image at a fixed tag: {_one('FROM')}"
    tag = match.group(1)
    service = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["service"]]
    (tf,) = [r for r in service if r.name == "tensorflow"]
    assert tf.specifier.contains(tag), f"image TensorFlow {tag} is outside pyproject's {tf}"
    assert f"tensorflow=={tag}\n" in CONSTRAINTS.read_text()


def test_constraints_pin_every_runtime_dependency_and_no_dev_tool() -> None:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    project = PYPROJECT["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["service"]:
        req = Requirement(text)
        pinned = pins.get(canonicalize_name(req.name))
        assert pinned is not None, f"{req.name} is not in {CONSTRAINTS.name}: rerun its generator"
        assert req.specifier.contains(pinned), f"{req.name}=={pinned} does not satisfy {req}"
    dev = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["dev"]}
    assert not dev & pins.keys() - {"protobuf", "grpcio"}, "dev tools do not belong in the image"
    install = " ".join(rest for kw, rest in _instructions() if kw == "RUN" and "pip" in rest)
    assert "--constraint docker/constraints.txt" in install and '".[service]"' in install


def test_image_runs_the_demo_as_a_non_root_user_on_all_interfaces_with_a_token() -> None:
    user = _one("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root USER (runAsNonRoot checks it)"
    entrypoint, cmd = _exec_form("ENTRYPOINT"), _exec_form("CMD")
    assert entrypoint[0] == "lrctl-trainer" and cmd == ["--demo"]
    args = trainer_args.parse(entrypoint[1:] + cmd)  # the trainer accepts it, without loading TF
    assert args.demo and args.listen.startswith("0.0.0.0:") and not args.insecure
    assert args.token_file == "/run/secrets/lrctl-token"
    # TLS keeps the token off the wire; the health port is plaintext for kubelet's probes.
    assert args.tls_cert and args.tls_key and not args.tls_client_ca
    assert args.health_listen.startswith("0.0.0.0:")
    assert args.verbose in (0, 2), "Keras's progress bar is unreadable in container logs"
    assert [int(p.split("/")[0]) for p in _one("EXPOSE").split()] == [
        _port(args.listen), _port(args.health_listen)]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(r for kw, r in _instructions() if kw == "ENV")))
    assert int(env["TF_CPP_MIN_LOG_LEVEL"]) >= 2


def test_healthcheck_probes_the_liveness_service_after_tensorflow_starts() -> None:
    options, _, command = _one("HEALTHCHECK").partition("CMD")
    settings = dict(re.findall(r"--([\w-]+)=(\S+)", options))
    assert int(settings["start-period"].removesuffix("s")) >= 60, "TF and CUDA start slowly"
    argv = json.loads(command)
    assert argv[0] == "lrctl"
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == "health" and args.service == ""
    # The plaintext health port: the main one serves TLS only.
    assert _port(args.target) == _port(_flag(_exec_form("ENTRYPOINT"), "--health-listen"))


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a match on a parent
    directory covers what is inside it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_admits_every_copy_source_and_nothing_secret() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [shlex.split(rest) for kw, rest in _instructions() if kw == "COPY"]
    sources = [src for words in copies for src in words[:-1] if not src.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f".dockerignore excludes {source}, which COPY needs"
    for secret in (".venv", ".git", "token", "server.key", "node_modules", "tests"):
        assert _ignored(secret, patterns), f"{secret} must stay out of the build context"


# --- Kubernetes ---


def test_manifests_have_the_expected_kinds_and_api_versions() -> None:
    found = {kind: doc["apiVersion"] for kind, doc in _manifests().items()}
    assert found == {
        "Job": "batch/v1",
        "Service": "v1",
        "Secret": "v1",
        "PersistentVolumeClaim": "v1",
    }


def test_manifests_pass_kubernetes_validate_strict() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                kv.validate(doc, kv.latest_version(), strict=True)


def test_job_asks_for_a_gpu_and_time_to_checkpoint_as_the_image_user() -> None:
    pod = _manifests()["Job"]["spec"]["template"]["spec"]
    container = _container()
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == _one("USER").split(":")[0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert re.fullmatch(r"lrctl:" + re.escape(PYPROJECT["project"]["version"]), container["image"])


def test_job_uses_native_grpc_probes_on_the_health_services() -> None:
    container = _container()
    # Kubelet's gRPC probes cannot speak TLS: they go to the plaintext health-only port.
    port = _port(_flag(_exec_form("ENTRYPOINT"), "--health-listen"))
    assert port != _port(_flag(_exec_form("ENTRYPOINT"), "--listen"))
    assert {"name": "health", "containerPort": port} in container["ports"]
    probes = {k: container[k]["grpc"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(p["port"] == port for p in probes.values())
    assert probes["startupProbe"]["service"] == "" and probes["livenessProbe"]["service"] == ""
    assert probes["readinessProbe"]["service"] == SERVICE_NAME
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "covers TF start-up"


def test_token_secret_is_mounted_where_the_image_reads_it() -> None:
    objects = _manifests()
    container, pod = _container(), objects["Job"]["spec"]["template"]["spec"]
    token_file = _flag(_exec_form("ENTRYPOINT"), "--token-file")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == token_file]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = objects["Secret"]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert mount["subPath"] in secret["stringData"]
    assert volume["secret"]["defaultMode"] & 0o040, "group-readable: the user reads it via fsGroup"
    assert "REPLACE" in secret["stringData"][mount["subPath"]], "the example holds a placeholder"


def test_tls_secret_is_mounted_where_the_image_reads_it() -> None:
    """The token travels over TLS: the Job mounts a kubernetes.io/tls Secret (keys tls.crt
    and tls.key) where the entrypoint's --tls-cert and --tls-key read them."""
    container, pod = _container(), _manifests()["Job"]["spec"]["template"]["spec"]
    entrypoint = _exec_form("ENTRYPOINT")
    cert, key = Path(_flag(entrypoint, "--tls-cert")), Path(_flag(entrypoint, "--tls-key"))
    assert cert.parent == key.parent and (cert.name, key.name) == ("tls.crt", "tls.key")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(cert.parent)]
    assert mount["readOnly"] is True and "subPath" not in mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "lrctl-tls"
    assert volume["secret"]["defaultMode"] & 0o040, "group-readable: the user reads it via fsGroup"
    assert "kubectl create secret tls lrctl-tls" in (K8S / "job.yaml").read_text()
    assert "kubectl create secret tls lrctl-tls" in (ROOT / "docs" / "operations.md").read_text()
    ports = {p["name"]: p for p in _manifests()["Service"]["spec"]["ports"]}
    assert ports["grpc"].get("appProtocol") != "kubernetes.io/h2c", "h2c is plaintext"


def test_service_reaches_the_trainer_ports() -> None:
    objects = _manifests()
    labels = objects["Job"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    argv = _exec_form("ENTRYPOINT") + _container()["args"]
    assert container_ports["grpc"] == _port(_flag(argv, "--listen"))
    assert container_ports["metrics"] == _port(_flag(argv, "--metrics-listen"))
    for port in service["ports"]:
        assert container_ports[port["targetPort"]] == port["port"], port["name"]


def test_job_args_are_accepted_by_the_trainer(capsys: pytest.CaptureFixture[str]) -> None:
    argv = _exec_form("ENTRYPOINT")[1:] + _container()["args"]
    with pytest.raises(SystemExit):
        trainer_args.parse(["--help"])
    known = set(re.findall(r"--[\w-]+", capsys.readouterr().out))
    used = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    assert used - known <= PENDING_FLAGS, f"unknown trainer flags: {used - known - PENDING_FLAGS}"
    missing = used - known
    args = trainer_args.parse([a for a in argv if a.split("=", 1)[0] not in missing])
    assert args.demo
    if missing:
        pytest.skip(f"lrctl-trainer has no {', '.join(sorted(missing))} yet (issue 8, items 1, 4)")


def test_readme_derived_image_lints_and_its_command_is_accepted(tmp_path: Path) -> None:
    """README's "put your code in the image" Dockerfile: hadolint-clean, and its CMD is a
    valid trainer command line after the base image's entrypoint."""
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"^```dockerfile\n(.*?)^```", readme, flags=re.MULTILINE | re.DOTALL)
    assert block.startswith("FROM lrctl:")
    match = re.search(r"^CMD (.*)$", block, flags=re.MULTILINE)
    assert match, "the derived image sets its own CMD"
    cmd = json.loads(match.group(1))
    args = trainer_args.parse(_exec_form("ENTRYPOINT")[1:] + cmd)
    assert args.model and not args.demo
    binary = Path(sys.executable).with_name("hadolint")
    if binary.exists():
        (tmp_path / "Dockerfile").write_text(block)
        result = subprocess.run(
            [str(binary), "--no-color", str(tmp_path / "Dockerfile")],
            check=False, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes: the 2-worker job ---


def test_multi_worker_job_names_its_workers_and_exposes_the_chief_alone() -> None:
    docs = [d for path in sorted((K8S / "multi-worker").glob("*.yaml"))
            for d in yaml.safe_load_all(path.read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    (container,) = pod["containers"]
    script = container["args"][0]
    # TF_CONFIG names every pod by the stable name an Indexed Job gives it in the subdomain.
    tf_config = re.search(r'TF_CONFIG="(.*?)" &&', script, re.DOTALL)
    assert tf_config is not None
    config = json.loads(tf_config.group(1).replace('\\"', '"').replace("${JOB_COMPLETION_INDEX}", "0"))
    name, subdomain = job["metadata"]["name"], pod["subdomain"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config["cluster"]["worker"] == [f"{name}-{i}.{subdomain}:{ports['tf-worker']}" for i in range(2)]
    assert services[subdomain]["spec"]["clusterIP"] == "None"
    # The control Service selects pod 0, the chief, which alone serves the API, with a token.
    control = services[name]["spec"]
    assert control["selector"]["batch.kubernetes.io/job-completion-index"] == "0"
    assert control["ports"][0]["targetPort"] == "grpc" and ports["grpc"] == 50051
    from lrctl.service.apps import multi_worker  # TensorFlow: only this test needs it

    args = multi_worker.parse(shlex.split(script.partition("-m lrctl.service.multi_worker")[2]))
    assert args.listen == "0.0.0.0:50051" and args.checkpoint_dir == "/ckpt"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args.token_file == mounts["token"]
    # The token never crosses the network in plaintext: the chief serves TLS from the Secret.
    assert (args.tls_cert, args.tls_key) == (f"{mounts['tls']}/tls.crt", f"{mounts['tls']}/tls.key")
    (tls,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "lrctl-tls"

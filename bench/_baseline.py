"""The new server beside the previous one, in one run: a git ref of the previous implementation
materialized once, and a trainer child of each side, the two taking turns.

`materialize(ref)` extracts `git archive REF` into /tmp/lrctl-bench/<sha> (kept: later runs
reuse it). A child started with that tree as its `lrctl_root` imports that lrctl from this same
venv (its service/ and client/ first on PYTHONPATH), and says which it imported.

Both children start at once and then take turns: `Sides.turn(side)` pauses the other's
training at a step boundary and resumes this one's, so each is measured alone on the
machine (as a single trainer would be), while the rounds alternate A B A B ... (B A in odd
rounds) so that drift on the machine hits both alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from _common import HERE, TrainerProcess

from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

REPO = os.path.dirname(HERE)
CACHE = os.path.join(tempfile.gettempdir(), "lrctl-bench")
SETTLE_S = 0.3  # after a resume, before measuring: the first steps after a wait run slow


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def materialize(ref: str) -> tuple[str, str]:
    """(sha, folder): the tree of `ref`, extracted once into CACHE/<sha>."""
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    root = os.path.join(CACHE, sha)
    if os.path.isfile(os.path.join(root, ".complete")):
        return sha, root
    os.makedirs(CACHE, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f"{sha[:12]}.", dir=CACHE)
    archive = subprocess.Popen(["git", "-C", REPO, "archive", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", partial], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {sha} failed")
    open(os.path.join(partial, ".complete"), "w").close()
    shutil.rmtree(root, ignore_errors=True)  # an interrupted extraction, never a complete one
    try:
        os.rename(partial, root)
    except OSError:  # another run put it there meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return sha, root


def working_tree() -> dict[str, Any]:
    """What the new side runs: this checkout's commit, and whether it has local changes."""
    try:
        return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "service", "client"))}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}


@dataclass
class Side:
    """One server under test. `new_api`: it has GetState views and WaitChange. `channel`: to its
    lrctl server; `echo_channel`: to the echo beside it."""

    name: str
    new_api: bool
    trainer: TrainerProcess
    channel: grpc.Channel
    echo_channel: grpc.Channel
    source: dict[str, Any]

    @property
    def state_view(self) -> int:
        """The GetState view this side's readers ask for: BASIC where there are views."""
        return pb.STATE_VIEW_BASIC if self.new_api else pb.STATE_VIEW_UNSPECIFIED

    def state_bytes(self) -> int:
        """The size of its GetState answer (in that view) now."""
        call = self.channel.unary_unary("/lrctl.v1.TrainingControlService/GetState")
        return len(call(pb.GetStateRequest(view=self.state_view).SerializeToString(),  # type: ignore[arg-type]
                        timeout=30))


class Sides:
    """The trainers of each side, started at once; one trains at a time (`turn`)."""

    def __init__(self, sides: list[Side]) -> None:
        self.all = sides
        self.current: Side | None = None

    def turn(self, side: Side) -> None:
        """Let `side` train alone: pause the others, resume it, let it settle."""
        if self.current is side:
            return
        if self.current is not None:
            self.current.trainer.pause()
        side.trainer.resume()
        self.current = side
        time.sleep(SETTLE_S)

    def give_history(self, changes: int) -> None:
        """Apply `changes` changes (scale x1: the learning rate stays) on each side, so that its
        whole state carries that many recent changes, as a trainer's that has had some."""
        request = pb.SetLearningRateRequest(scale=1.0, wait_until_applied=True)
        for side in self.all:
            self.turn(side)
            stub = pb_grpc.TrainingControlServiceStub(side.channel)
            for _ in range(changes):
                stub.SetLearningRate(request, timeout=60)
        time.sleep(0.3)  # a change clears the state's metrics until the next publish (0.1 s)

    def rounds(self, count: int) -> Iterator[tuple[int, Side]]:
        """(round, side) for `count` rounds: A B, then B A, A B, ..."""
        for r in range(count):
            for side in self.all if r % 2 == 0 else self.all[::-1]:
                self.turn(side)
                yield r, side


@contextlib.contextmanager
def open_sides(baseline: str, candidate: str | None = None) -> Iterator[Sides]:
    """The new side (this checkout's lrctl, or `candidate`'s tree) and the baseline (`baseline`'s
    tree), started at once, each with a channel; the new side trains first."""
    trees: list[tuple[str, bool, str | None, dict[str, Any]]] = []
    if candidate is None:
        trees.append(("new", True, None, {"ref": "working tree", **working_tree()}))
    else:
        sha, root = materialize(candidate)
        trees.append(("new", True, root, {"ref": candidate, "sha": sha}))
    sha, root = materialize(baseline)
    trees.append(("baseline", False, root, {"ref": baseline, "sha": sha}))
    with contextlib.ExitStack() as stack:
        trainers = [stack.enter_context(TrainerProcess(lrctl_root=root, wait=False)) for _, _, root, _ in trees]
        for trainer in trainers:
            trainer.wait_ready()
        sides = [Side(name, new_api, trainer, stack.enter_context(grpc.insecure_channel(trainer.target)),
                      stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{trainer.echo_port}")),
                      {**source, "lrctl": trainer.lrctl_file})
                 for (name, new_api, _, source), trainer in zip(trees, trainers, strict=True)]
        for side in sides[1:]:
            side.trainer.pause()
        together = Sides(sides)
        together.current = sides[0]
        yield together

"""The run-control changes, each described once: its RPC and request, the client method that
sends it (sync and asyncio), the `lrctl` command, and its help, which both clients' docs and
the command's --help are read from. Each is a change like a learning-rate one, with the
change options but `force` and `preview_steps`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from lrctl.client.changes import ChangeOptions
from lrctl.client.messages import apply_options, duration
from lrctl.v1 import training_control_pb2 as pb

__all__ = ["OPTION_NAMES", "RUN_ACTIONS", "RunAction", "run_action_request"]

#: The change options a run-control request has (no force, no preview).
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ChangeOptions)
                     if f.name not in ("force", "preview_steps"))


@dataclass(frozen=True)
class RunAction:
    method: str  # the clients' method
    request: type[Message]  # the RPC's request (its name is the RPC's and "Request")
    command: str  # `lrctl COMMAND`
    help: str  # one line: the command's help, and the start of the method's docs
    examples: tuple[str, ...]  # for the command's --help
    detail: str = ""  # the rest of the method's docs
    #: The request's own fields from the method's own arguments.
    fields: Callable[..., dict[str, Any]] = dict
    deadline: str = "timeout"  # the method's argument for the RPC's deadline

    @property
    def rpc(self) -> str:
        return self.request.DESCRIPTOR.name.removesuffix("Request")

    @property
    def doc(self) -> str:
        """The client method's docs."""
        first = self.help[0].upper() + self.help[1:] + "."
        options = ("The keyword arguments are `ChangeOptions` but `force` and `preview_steps`; "
                   f"`{self.deadline}` is the RPC deadline in seconds (None: the client's).")
        return "\n\n".join(text for text in (first, self.detail, options) if text)


def _pause_fields(timeout: float | None) -> dict[str, Any]:
    """PauseTraining's own field: `timeout` seconds, > 0 (None: the server's default)."""
    if timeout is None:
        return {}
    if not timeout > 0:
        raise ValueError(f"Argument `timeout` must be > 0 seconds. Received: timeout={timeout!r}")
    return {"timeout": duration(timeout)}


RUN_ACTIONS = {action.method: action for action in (
    RunAction(
        "pause_training", pb.PauseTrainingRequest, "pause",
        "pause training at the next step boundary, until resumed or for its timeout; changes "
        "still apply while paused",
        ("lrctl pause --timeout 30m --reason 'inspect the loss spike'", "lrctl resume",
         "lrctl --timeout 5 pause    (the RPC deadline goes before the command)"),
        "It waits there until `resume_training`, `stop_training`, a shutdown, or `timeout` "
        "seconds (the pause's own; None: the server's default, 1 hour; at most 7 days). "
        "Pausing a paused run restarts its timeout.",
        _pause_fields, "rpc_timeout"),
    RunAction(
        "resume_training", pb.ResumeTrainingRequest, "resume",
        "resume a paused run (no effect if it is not paused)", ("lrctl resume",)),
    RunAction(
        "save_checkpoint", pb.SaveCheckpointRequest, "checkpoint",
        "write a checkpoint at the next step boundary (the trainer needs --checkpoint-dir)",
        ("lrctl checkpoint --json", "lrctl checkpoint --at-step 5000"),
        "The applied change names it (`checkpoint_path`, `checkpoint_step`); "
        "`FailedPrecondition` if the trainer has no checkpoint folder."),
    RunAction(
        "stop_training", pb.StopTrainingRequest, "stop",
        "end the run for good at a step boundary: a final checkpoint, pending changes "
        "cancelled with its reason, the trainer exits 0",
        ("lrctl stop --reason 'ASHA: bottom half at rung 2'", "lrctl stop --at-step 10000"),
        "Its phase becomes FINISHED."),
    RunAction(
        "load_checkpoint", pb.LoadCheckpointRequest, "load",
        "load another checkpoint's weights and optimizer state at a step boundary, keeping "
        "this run's step (its path under the trainer's --checkpoint-root)",
        ("lrctl load member-3    (its newest checkpoint)",
         "lrctl load member-3/ckpt-4000.weights.h5 --with-hyperparameters"),
        "`path` is a folder written with --checkpoint-dir (its newest checkpoint) or one of "
        "its weights files; with `load_hyperparameters`, its learning-rate schedule and "
        "hyperparameters are loaded too. The applied change names the file, its step and the "
        "run that wrote it."),
)}


def run_action_request(action: RunAction, options: Mapping[str, Any], **arguments: Any) -> Message:
    """The request of `action`: its own fields from the method's own `arguments`, and the
    change `options` (keyword arguments of `ChangeOptions`)."""
    return apply_options(action.request(**action.fields(**arguments)), ChangeOptions(**options))

"""What each client method does, described once for the sync and the asyncio client: both
classes take their methods' docs from here (`documented`), so the classes hold only the
typed signatures Python needs and the plan each method runs (`calls`)."""

from __future__ import annotations

from typing import TypeVar

from lrctl.client.run_actions import RUN_ACTIONS

__all__ = ["DOCS", "documented"]

C = TypeVar("C", bound=type)

#: Each public method's docs, by name (the run-control ones are `run_actions`').
DOCS = {
    "close": """\
Close the channel; cancels in-flight calls, including watches.""",
    "get_state": """\
Return a snapshot of the training state (`TrainingState`). `view="basic"` leaves
out the pending and recent change lists (`list_changes` has them).""",
    "set_learning_rate": """\
Pin the learning rate to `value` (resets the scale to 1). The keyword arguments
are `ChangeOptions`; `timeout` is the RPC deadline in seconds (None: the client's).

Returns the `Change` (status PENDING, APPLIED, ABORTED, CANCELLED or VALIDATED).""",
    "scale_learning_rate": """\
Multiply the active schedule by `factor` (cumulative with earlier scales).
Arguments and result as for `set_learning_rate`.""",
    "set_optimizer_parameters": """\
Set optimizer hyperparameters (`momentum`, `beta_1`, `beta_2`, `epsilon`,
`weight_decay`, `clipnorm`, `global_clipnorm`, `clipvalue`) or registered variables,
by name, as one change at a step boundary (SetOptimizerParameters); the options as for
`set_learning_rate` (`force` and `preview_steps` do not apply).
`TrainingState.hyperparameters` lists what the trainer can set.""",
    "swap_schedule": """\
Replace the active schedule (resets the scale to 1): `schedule`, `origin`,
`schedule_start_step` and `scale` are `Swap`'s; the rest as for `set_learning_rate`.""",
    "watch": """\
Stream `TrainingState` updates until training ends or the watch is cancelled.

Updates come at most every `min_interval` seconds while training advances, and at
once after each applied change. Returns a `Watch` (the asyncio client: an `AsyncWatch`,
for `async for`): iterate it, and end it with `cancel()` (from any thread) or by leaving
`with client.watch(...) as updates:`; either cancels the RPC, as does cancelling the task
that iterates an `AsyncWatch`. `timeout` bounds the whole stream (`None`, the default: no deadline,
not the client's). Triggers: `every_steps` (an update each time training is that many
steps on), `on_epoch_end` (one per new epoch), `changes_only` (no time-based updates;
changes, phase changes and the triggers still send). `view="basic"`: updates without
the change lists.""",
    "cancel_change": """\
Cancel a pending change, named by the `request_id` it was sent with (every change
this client sends has one: `Change.request_id`) or by its `version`: give exactly one.
Returns the CANCELLED `Change`; `reason` and the fences are as in `ChangeOptions`.

Raises `NotFound` for an unknown change and `FailedPrecondition` for one that has
already been applied, aborted or failed.""",
    "list_changes": """\
One page of changes, newest first (pending and the last 10,000 finished ones).
`page_size` 0 asks for the server's default (50); pass the response's
`next_page_token` as `page_token` for the next page (empty: the last page), with the
same `filter`: conditions joined by AND, e.g. `status = APPLIED AND version >= 12`
(`status`, `version`, `request_id`; see ListChangesRequest.filter). With a selective
filter a page may be short, even empty, and still have a next page.""",
    "iter_changes": """\
Every change `list_changes` pages through, newest first (those matching `filter`).""",
    "list_measurements": """\
One page of the run's measurements (batch and epoch logs, the last 10,000), oldest
first, at or after `start_step`. `page_size` 0: the server's default (100; 1,000 at
most). Pass the response's `next_page_token` as `page_token` to read what came after,
also after a reconnection: a page with no measurements means nothing newer yet, and
`truncated` says that some were dropped before you read them.""",
    "iter_measurements": """\
Every measurement `list_measurements` pages through, oldest first; with `follow`,
keeps asking (every `poll_interval` seconds once caught up) for new ones.""",
    "health": """\
Return the standard gRPC health status name, e.g. "SERVING" or "NOT_SERVING".
`service=""` asks about the server as a whole; the training service registers as
"lrctl.v1.TrainingControlService". An unknown service raises `NotFound`.""",
    "wait_until_ready": """\
Block until the trainer is reachable and training (its training service reports
SERVING). Raises `DeadlineExceeded` after `timeout` seconds (`None`: no limit).""",
    "update": """\
Read-modify-write: read the state, call `decide(state)`, and send what it returns,
`Scale(factor)`, `Pin(learning_rate)` or `Swap(schedule, ...)` (None: no change, returns
None), with `expected_version=state.version`, waiting until it is applied. If another
change gets in first (`VersionConflict` on arrival, or aborted at the step boundary),
read the fresh state and call `decide` again, up to `retries` more times; then the
conflict is raised. It never returns a pending change that may still abort.

    client.update(lambda s: Scale(0.5) if s.metrics["loss"] > 1 else None)

`reason`, `force` and the fences are as in `ChangeOptions` (they go with every send);
`expected_version` says you decided on that version already: a state at another
version raises `VersionConflict` at once, with no new decision. `timeout` is each
RPC's deadline, the wait for the outcome included (`DeadlineExceeded`: it stays pending).""",
    "update_learning_rate": """\
`update` for the learning rate `fn(state)` wants now, sent as a scale of the active
schedule by `fn(state) / state.learning_rate`: the schedule keeps its kind and keeps
running (a CosineDecay stays a CosineDecay, scaled). On a conflict `fn` is called again
on the fresh state. `ValueError` if the schedule gives 0 now (use `update` with `Pin`).
Other arguments as for `update`.

    client.update_learning_rate(lambda s: s.learning_rate * 0.5, reason="plateau")""",
    "learning_rate_at": """\
The learning rate the current schedule and scale give at a future `step`, as the
trainer computes it (a validate_only no-op change: needs the write role; nothing is
queued). `FailedPrecondition` if `step` has passed.""",
    "get_change": """\
The change named `name` (`Change.name`, "changes/{id}", on every change the server
accepted), or the one sent with `request_id`, or applied as `version`: give exactly one.
Raises `NotFound` if the server no longer has it (it keeps every pending change and the
last 10,000 finished ones), `InvalidArgument` for a malformed name.""",
    "wait_change": """\
Wait until the change (named as for `get_change`) is terminal (applied, failed,
aborted or cancelled) and return it. The server answers the moment it is (WaitChange):
nothing polls, and `poll_interval` is accepted and ignored. While the trainer restarts
it asks again until `timeout`. Raises `DeadlineExceeded` after `timeout` seconds
(`None`: no limit); the change stays pending.""",
    **{method: action.doc for method, action in RUN_ACTIONS.items()},
}


def documented(cls: C) -> C:
    """Give each public method of the client class `cls` its docs from `DOCS`. A public
    method with none fails at import: a new method is described here, once."""
    for name, member in vars(cls).items():
        if not name.startswith("_") and callable(member):
            member.__doc__ = DOCS[name]
    return cls

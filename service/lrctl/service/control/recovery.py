"""Recovery: the control state a checkpoint carries, and the write-ahead log's records after
it, put back in a new process so that a restarted run is the same run.

`export_state` writes what `import_state` reads (`persistence` is the JSON); `replay` then puts
back every change the log acknowledged after that checkpoint: pending ones pending again,
applied ones re-applied at their step with their version, the rest in the ledger.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from lrctl.service.control import persistence
from lrctl.service.control.changes import ChangeStatus
from lrctl.service.control.core import ControlCore
from lrctl.service.schedules import forms

logger = logging.getLogger("lrctl.controller")


def export_state(core: ControlCore, step: int | None = None) -> dict[str, Any]:
    """`Controller.export_state`, under both locks: no record half-committed."""
    with core.submit_lock, core.cond:
        snap = core.board.current
        step = snap.step if step is None else step
        (schedule, version), replay = (core.state, core.version), core.queue.replays
        if core.engine_behind is not None:
            # Decided ahead, not loaded: the checkpoint's engine holds what ran at `step`; the
            # changes applied after it are re-applied at their step, like a restart's replays.
            schedule, version = core.engine_behind
            ahead = {c.id: c for c in core.ledger.history()
                     if c.status is ChangeStatus.APPLIED and (c.applied_step or 0) > step}
            replay = sorted({**ahead, **{c.id: c for c in replay}}.values(),
                            key=lambda c: (c.applied_step or 0, c.version))
        return persistence.state_to_json(
            run_id=snap.run_id, step=step, epoch=core.epochs_done,
            schedule=schedule, version=version, pending=core.queue.changes(),
            finished=core.ledger.finished(), history=core.ledger.history(),
            replay=replay, wal_seq=core.wal.seq if core.wal is not None else 0,
            stopped_step=core.stopped_step,
            measurement_sequence=core.measurements.last_sequence)


def import_state(core: ControlCore, data: Mapping[str, Any]) -> None:
    """`Controller.import_state`: the queue, the ledger, the state and the snapshot."""
    saved = persistence.state_from_json(data)
    with core.cond:
        core.state, core.version = saved.schedule, saved.version
        core.ids = itertools.count(saved.next_id)
        core.queue.restore(saved.pending, saved.replay)
        core.ledger.restore(saved.finished, saved.history, saved.pending)
        core.epochs_done = saved.epoch
        core.stopped_step = saved.stopped_step
        core.measurements.resume(saved.measurement_sequence, saved.step)
        core.boundary_step = max(core.boundary_step, saved.step)
        # A resumed run is the same run: it keeps its id (unless the caller named one).
        run_id = core.board.current.run_id
        core.board.update(
            run_id=run_id if core.run_id_given else saved.run_id or run_id, step=saved.step,
            epoch=saved.epoch, schedule=core.state, version=core.version,
            learning_rate=forms.learning_rate(core.state, saved.step), updated_time=core.clock(),
            measurement_sequence=core.measurements.last_sequence)
        core.republish(pending=True, history=True)


def replay(core: ControlCore, records: Iterable[Mapping[str, Any]]) -> int:
    """`Controller.replay`: each change's last record put back where it belongs. The records
    with a higher seq than the imported state's `wal_seq` count, in seq order; a change's last
    record wins. Accepted: pending again. Applied: kept in the ledger as it was answered, and
    loaded again with its version at the first boundary at or after its step (training
    repeats those steps); pending changes and new ones wait until then. Cancelled, aborted,
    failed: in the ledger. Ids and versions continue above every one in the log."""
    last, run_id = persistence.last_records(records)
    if not last:
        return 0
    with core.cond:
        count = 0
        replays = core.queue.replays
        for change in sorted(last.values(), key=lambda c: c.id):
            known = core.lookup(change.id)
            if known is not None and known.status is not ChangeStatus.PENDING:
                continue  # its ending is in the checkpoint already
            count += 1
            core.ledger.name(change)
            if change.status is ChangeStatus.PENDING:
                if known is None:
                    core.queue.add(change)
                continue
            core.queue.remove(change.id)
            core.finish(change, replayed=True)
            if change.status is ChangeStatus.APPLIED:
                replays.append(change)
        replays.sort(key=lambda c: (c.applied_step or 0, c.version))
        core.ids = itertools.count(max(next(core.ids), max(last) + 1))
        # Clients see the newest version acknowledged, while training repeats its steps.
        core.board.update(version=core.top_version())
        if run_id and not core.run_id_given:  # no checkpoint yet: the log names the run
            core.board.update(run_id=run_id)
        core.republish(pending=True, history=True)
    if replays:
        logger.info("replaying %d change(s) applied before the restart: from step %s to step %s "
                    "(v%d to v%d); other changes wait until then", len(replays),
                    replays[0].applied_step, replays[-1].applied_step, replays[0].version,
                    replays[-1].version)
    return count

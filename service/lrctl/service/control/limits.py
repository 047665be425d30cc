"""The control domain's limits, each stated once: what one controller holds and accepts.

Every module that checks or quotes one of them (the controller, the policy, the servicer, the
guardrails, the docs' tests) imports it from here, so a limit cannot drift between two copies.
"""

from __future__ import annotations

#: Finished changes remembered, newest last: a retry of any of their request ids returns the
#: record instead of applying again, and ListChanges pages through them. Measured: ~0.9 KB a
#: record (9 MB for the window); ~13 KB for a 64-knot swap with a 1 KiB reason.
DEDUP_WINDOW = 10_000
#: Changes accepted but not yet applied, at most; beyond, RESOURCE_EXHAUSTED.
MAX_PENDING = 1_000
#: A change's (or a cancellation's) reason, in UTF-8 bytes.
MAX_REASON_BYTES = 1024
MAX_REQUEST_ID_BYTES = 128
#: A SetOptimizerParameters name (at most this many in one request), and a LoadCheckpoint path:
#: errors quote them, and an error's message and details must fit gRPC's 8 KiB of metadata.
MAX_PARAMETER_NAME_BYTES = 128
MAX_PARAMETERS = 64
MAX_PATH_BYTES = 1024
#: expected_run_id and expected_incarnation; longer ones cannot match any id this server hands out.
MAX_RUN_ID_BYTES = 128
#: How far ahead of the current step `apply_at_step` may lie, and the longest
#: `apply_after_steps`, `schedule_start_step`, preview or guardrail horizon (a typo guard, not a policy).
APPLY_HORIZON = 1_000_000_000
#: Pending changes listed in a snapshot, oldest first; ListChanges lists them all. Keeps every
#: GetState/WatchState response far below gRPC's 4 MB default limit.
SNAPSHOT_PENDING = 100
#: A ListChanges filter, in UTF-8 bytes (a few conditions need a few dozen).
MAX_FILTER_BYTES = 1024
#: Records one ListChanges call examines at most under the controller's lock: a selective
#: filter returns a short page (even an empty one) and a token to go on, never a scan of the
#: whole ledger in one call.
LIST_SCAN_LIMIT = 1000
#: PauseTraining's timeout when none is given, and the longest one (seconds): training resumes
#: by itself after it, so a forgotten pause does not hold a GPU for days.
DEFAULT_PAUSE_TIMEOUT = 3600.0
MAX_PAUSE_TIMEOUT = 7 * 24 * 3600.0
#: Measurements (batch and epoch logs) a run keeps for ListMeasurements, newest last.
MAX_MEASUREMENTS = 10_000

"""The limits and defaults the docs quote are the code's: each is stated once in the code, and
README.md, docs/operations.md, docs/design.md and docs/internals.md may only quote it.

No TensorFlow: every constant checked here lives in a pure module. A reworded sentence fails
with the pattern that no longer matches; fix the pattern or the doc, never the number alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lrctl.client
from lrctl.service.apps import trainer_args
from lrctl.service.control import disk, guardrails, limits, run_control
from lrctl.service.observability import logs
from lrctl.service.rpc import auth, budgets, journal, servicer, watch
from lrctl.service.schedules import forms, specs

DOCS = Path(__file__).resolve().parent.parent
SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
WORDS = {"eight": 8}


def _number(text: str) -> float:
    """'1,000' -> 1000, '10⁹' -> 10**9, 'eight' -> 8, '0.5' -> 0.5."""
    if text in WORDS:
        return WORDS[text]
    if "⁰" <= text[-1] <= "⁹" or text[-1] in "¹²³":
        base, power = text[:2], text[2:].translate(SUPERSCRIPTS)
        return float(int(base) ** int(power))
    return float(text.replace(",", ""))


N = r"([\d,.]+|10[⁰¹²³⁴⁵⁶⁷⁸⁹]+|eight)"
KIB, MIB = 1024, 2**20

# (name, file, pattern with one group per number, the code's values in the same order, each value
# divided by the unit the doc quotes it in).
OPS, README, DESIGN = "docs/operations.md", "README.md", "docs/design.md"
INTERNALS = "docs/internals.md"
QUOTES: list[tuple[str, str, str, tuple[float, ...]]] = [
    # docs/operations.md, the limits table
    ("pending", OPS, rf"\| pending changes \| {N} \[", (limits.MAX_PENDING,)),
    ("reason-request-id", OPS, rf"\| `reason` / `request_id` \| {N} KiB / {N} bytes",
     (limits.MAX_REASON_BYTES / KIB, limits.MAX_REQUEST_ID_BYTES)),
    ("parameters-path", OPS, rf"\| `SetOptimizerParameters` / `LoadCheckpoint.path` \| {N} names of at most {N} bytes / {N} KiB",
     (limits.MAX_PARAMETERS, limits.MAX_PARAMETER_NAME_BYTES, limits.MAX_PATH_BYTES / KIB)),
    ("apply-horizon", OPS, rf"`apply_at_step` \| ≤ current step \+ {N} ", (limits.APPLY_HORIZON,)),
    ("dedup-window", OPS, rf"\| dedup window \| every pending id \+ the last {N} finished",
     (limits.DEDUP_WINDOW,)),
    ("snapshot-pending", OPS, rf"\| changes in a state \| {N} oldest pending", (limits.SNAPSHOT_PENDING,)),
    ("page-size", OPS, rf"\| `ListChanges` page \| {N} by default, {N} at most",
     (servicer.DEFAULT_PAGE_SIZE, servicer.MAX_PAGE_SIZE)),
    ("measurements", OPS,
     rf"\| measurements kept \| the last {N} \(batch logs at most once a second .*?`ListMeasurements` page {N} by default, {N} at most",
     (limits.MAX_MEASUREMENTS, servicer.MEASUREMENTS_PAGE_SIZE, servicer.MAX_MEASUREMENTS_PAGE_SIZE)),
    ("filter", OPS, rf"\| `ListChanges.filter` \| {N} KiB \[`INVALID_ARGUMENT`\]; a call examines at most {N} changes",
     (limits.MAX_FILTER_BYTES / KIB, limits.LIST_SCAN_LIMIT)),
    ("watch-interval", OPS,
     (rf"\| `WatchState.min_interval` \| \[0, {N} h\] \[`INVALID_ARGUMENT`\]; "
      rf"time-based updates at most every {N} s"),
     (servicer.MAX_WATCH_INTERVAL / 3600, watch.MIN_TIMED_INTERVAL)),
    ("open-streams", OPS,
     rf"\| open streams \| `WatchState` {N}; Health/Watch and reflection {N} .*?; waiting calls {N} ",
     (budgets.MAX_STREAMS, budgets.MAX_OPEN_STREAMS, budgets.MAX_WAITERS)),
    # docs/operations.md, prose
    ("horizon", OPS, rf"`horizon_steps` \(default {N},", (guardrails.DEFAULT_HORIZON,)),
    ("open-budget", OPS,
     rf"budget of their own \({N}, `MAX_OPEN_STREAMS`\): anonymous callers can never take the {N} slots",
     (budgets.MAX_OPEN_STREAMS, budgets.MAX_STREAMS)),
    ("refusal-text", OPS, rf"error \(cut to {N} characters\)", (journal.MAX_REFUSAL_TEXT,)),
    ("refusals-per-minute", OPS, rf"never its payload \(≤ ~1 KiB a line\); at most {N} a minute",
     (journal.REFUSALS_PER_MINUTE,)),
    ("free-space", OPS, rf"and have {N} MiB free", (disk.MIN_FREE_BYTES / MIB,)),
    # README.md
    ("readme-guardrails", README, rf"`--max-learning-rate` \(default {N}, checked over the\s+next {N} steps",
     (trainer_args.DEFAULT_MAX_LR, guardrails.DEFAULT_HORIZON)),
    ("readme-rate", README, rf"`--max-changes-per-minute` \(default {N}\)", (trainer_args.DEFAULT_RATE,)),
    ("readme-limits", README,
     (rf"\*\*Limits\*\*: {N} pending changes, a {N} KiB `reason`, a {N}-byte `request_id`,\s+"
      rf"`apply_at_step` at most {N} steps ahead, {N} open streams, {N} waiting calls"),
     (limits.MAX_PENDING, limits.MAX_REASON_BYTES / KIB, limits.MAX_REQUEST_ID_BYTES,
      limits.APPLY_HORIZON, budgets.MAX_STREAMS, budgets.MAX_WAITERS)),
    # docs/design.md
    ("design-engine", DESIGN, rf"form, {N} float32\s+coefficients, {N} boundary/knot steps with {N} rates",
     (forms.NUM_COEFFICIENTS, specs.CAPACITY, specs.CAPACITY + 1)),
    # docs/internals.md (the details behind design.md)
    ("internals-engine", INTERNALS, rf"form, {N} float32\s+coefficients, {N} boundary/knot steps with {N} rates",
     (forms.NUM_COEFFICIENTS, specs.CAPACITY, specs.CAPACITY + 1)),
    ("internals-measurements", INTERNALS, rf"go into a\s+ring of the last {N}, numbered", (limits.MAX_MEASUREMENTS,)),
    ("internals-scan", INTERNALS, rf"on at most {N} records\s+per call", (limits.LIST_SCAN_LIMIT,)),
    ("internals-pause-poll", INTERNALS, rf"slices of `PAUSE_POLL` \({N} s\)", (run_control.PAUSE_POLL,)),
]


@pytest.mark.parametrize(("doc", "pattern", "values"), [q[1:] for q in QUOTES], ids=[q[0] for q in QUOTES])
def test_docs_quote_the_codes_limits(doc: str, pattern: str, values: tuple[float, ...]) -> None:
    match = re.search(pattern, (DOCS / doc).read_text(encoding="utf-8"))
    assert match, f"{doc} no longer says {pattern!r}"
    assert tuple(_number(n) for n in match.groups()) == tuple(float(v) for v in values), match.group(0)


def test_docs_quote_the_default_address_log_rate_and_journal_name() -> None:
    readme = (DOCS / "README.md").read_text(encoding="utf-8")
    match = re.search(r"--target defaults to \$LRCTL_TARGET or (\S+)\b", readme)
    assert match, "README no longer says the CLI's default target"
    # The client package cannot import the service, so each states its own default; they
    # must agree, or `lrctl` would not reach a trainer started with defaults.
    assert match.group(1) == lrctl.client.DEFAULT_TARGET == auth.DEFAULT_ADDRESS
    assert "| gRPC's own log records | at most one per call site per minute |" in (
        DOCS / OPS).read_text(encoding="utf-8")
    assert logs.LOG_INTERVAL == 60
    for doc in (OPS, DESIGN, INTERNALS):
        assert f"`DIR/{journal.JOURNAL_NAME}`" in (DOCS / doc).read_text(encoding="utf-8"), doc

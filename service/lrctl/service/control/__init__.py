"""The control domain: changes, their queue and ledger, the policy (guardrails, rate limit),
the outcomes at the boundary, snapshots and waiting, persistence and the write-ahead log, and
the protocols of what it drives (targets: the engine, parameter variables, run actions, the
log). Pure Python: imports `schedules`' pure modules (specs, forms) and `errors`, never
TensorFlow, gRPC or another layer."""

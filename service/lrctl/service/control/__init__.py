"""The control domain, pure Python with no TensorFlow: changes, their queue and ledger, the
policy (guardrails, outcomes, rate limit), snapshots and waiting, persistence and the write-ahead log."""

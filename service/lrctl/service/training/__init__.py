"""The Keras integration at the step boundary: attaching to an optimizer, one step clock, the
divergence guard, the multi-worker exchange, checkpoints and `.keras` loading. Imports
TensorFlow, `control` and `schedules` (and `rpc.budgets.short` for log lines); never `apps`."""

"""The Keras integration at the step boundary: attaching to an optimizer, one step clock, the
run's lifecycle, the divergence guard, the multi-worker exchange, checkpoints and `.keras`
loading. Imports TensorFlow, `control`, `schedules`, `errors` and `observability.logs`; never
`rpc` or `apps`."""

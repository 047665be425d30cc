"""What lrctl reports about itself: Prometheus metrics, TensorBoard scalars, and its logs'
hygiene. `logs` imports nothing of lrctl, so every layer may use it; `metrics` reads `control`
and `rpc`, `tensorboard` reads `training`."""

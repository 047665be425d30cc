"""What lrctl reports about itself: Prometheus metrics, TensorBoard scalars and its logs' hygiene.
May import control, rpc and training; `logs` imports nothing, so every layer may use it."""

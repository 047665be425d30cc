"""What lrctl reports about itself: Prometheus metrics and TensorBoard scalars."""

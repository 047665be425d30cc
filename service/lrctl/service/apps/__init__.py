"""Programs: `lrctl-trainer`, the multi-worker demo trainer and the demo model."""

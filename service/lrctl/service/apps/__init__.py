"""Programs: `lrctl-trainer`, the multi-worker demo trainer and the demo model. May import
every other subpackage; nothing imports them."""

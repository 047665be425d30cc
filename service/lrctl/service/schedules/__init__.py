"""What a schedule is and how it is computed: the kinds (kinds.py, one registration each), their
forms and exact extremes (pure Python and numpy), and the TensorFlow engine that evaluates them
in the graph (engine.py, packing.py). Imports only `errors` from lrctl."""

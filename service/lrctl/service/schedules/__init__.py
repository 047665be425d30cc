"""What a schedule is and how it is computed: the kinds (kinds.py, one registration each), their
forms and exact extremes (pure Python and numpy), the TensorFlow engine that evaluates them in
the graph (engine.py, packing.py), and `.keras` I/O. Imports only control.errors from lrctl."""

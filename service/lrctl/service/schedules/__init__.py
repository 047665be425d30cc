"""What a schedule is and how it is computed: specs, their forms and exact extremes (pure
Python and numpy), the TensorFlow engine that evaluates them in the graph, and `.keras` I/O."""

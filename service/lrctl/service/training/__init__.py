"""The Keras integration, at the step boundary: attaching to an optimizer, the step clock,
the divergence guard, the multi-worker exchange and checkpoints. Imports TensorFlow."""

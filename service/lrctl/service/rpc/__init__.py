"""The gRPC face: proto <-> domain conversion, status mapping, the servicer, the server, auth,
stream budgets and the journal. Imports no TensorFlow."""

"""The gRPC face: proto <-> domain conversion, status mapping, the servicer, the server, auth,
stream budgets and the journal. Imports `control`, `schedules`' pure modules, `errors` and
`observability.logs`; never TensorFlow."""

"""The gRPC face: proto <-> domain conversion (the mutation requests' in change_requests), status
mapping, the servicer with how its mutations run and its calls wait, the server, auth, stream
budgets and the journal. Imports `control`, `schedules`' pure modules, `errors` and
`observability.logs`; never TensorFlow."""

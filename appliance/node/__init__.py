"""The node daemon (`appliance serve`): the state store, the supervisor of engines and
replica servers, the controllers, the REST API and the metrics."""

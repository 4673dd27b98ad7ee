"""Fan-out benchmark: sse-gateway against a hand-rolled baseline and nchan (``python -m bench``)."""

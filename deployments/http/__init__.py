"""The OpenAI-compatible HTTP layer: request schemas, errors, response builders, the FastAPI app,
the fan-out to the model replicas and the Python-handle API."""

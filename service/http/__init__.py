"""HTTP layer: routes, protocol models, dependencies, middleware and errors (FastAPI)."""

"""Engine: model registry, inference pool, runtime, state resolution and caches."""

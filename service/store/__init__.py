"""Storage: user sequences and states in Redis, and the embedded Redis server."""

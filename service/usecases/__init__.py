"""Use cases: rank, events, admin. Framework-free; they call the engine and the store."""

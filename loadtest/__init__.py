"""Seeding, load generation, the benchmark and the locust scenarios."""

"""Checks of deploy/: Dockerfile, compose, Kubernetes, Prometheus, Grafana."""

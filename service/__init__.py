"""The ranking service (FastAPI + Redis + ONNX Runtime); see docs/service.md.

Nothing is configured or started at import: `service.app.create_app(settings)`.
"""

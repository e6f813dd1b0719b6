"""Training side: data, the IFA model and its baselines, training, evaluation, ONNX export.

Needs torch (the `train` extra). Nothing in `service/` imports this package.
"""

"""ONNX export of an IFA model: the graphs and their CPU layouts, the manifest, the parity check."""

"""Scoring a bundle exactly as the daemon runs it (ONNX Runtime, no torch)."""

"""The online half: ``forecaster serve``. ONNX Runtime, MQTT, per-stream state, metrics.

Nothing under this package may import torch, onnx or :mod:`forecaster.training`
(``tests/unit/test_layout.py`` checks it): the daemon installs without the ``train`` extra.
"""

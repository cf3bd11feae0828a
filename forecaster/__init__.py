"""forecaster: streaming one-step-ahead forecasts for MQTT sensor streams.

The package splits into an offline half (``data``, ``nn``, ``train``, ``export``; needs the
``train`` extra with PyTorch) and an online half (``bundle``, ``codec``, ``state``, ``batcher``,
``mqtt``, ``daemon``, ``metrics``) that runs on ONNX Runtime alone.
"""

__version__ = "0.1.0"

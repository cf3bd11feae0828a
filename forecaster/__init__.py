"""forecaster: streaming one-step-ahead forecasts for MQTT sensor streams.

The layout is the architecture (docs/architecture.md): ``serve`` is the daemon and runs on ONNX
Runtime alone; ``training`` needs the ``train`` extra with PyTorch; ``model`` is the bundle
contract between them; ``evaluation`` scores a bundle as the daemon runs it; ``harness`` starts
brokers and daemons for tests, benchmarks and ``demo``; ``cli`` sits on top.
"""

__version__ = "0.1.0"

"""The offline half: ``forecaster train`` and ``export`` (PyTorch; the ``train`` extra)."""

"""The contract between training and serving: the bundle (``model.onnx`` + ``model.json``).

Nothing here imports torch: the daemon loads bundles, the training side writes them.
"""

"""``python -m forecaster.demo`` (``make demo``): the whole product on one screen."""

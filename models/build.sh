#!/usr/bin/env bash
# Rebuild the bundled model(s) from the data in this repository. Deterministic: same seed, same
# weights on the same PyTorch build (torch==2.13.0 CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -m forecaster train data/water-flow.csv --time-column Time --until 1014 \
    --cell lstm --layers 2 --hidden 64 --epochs 30 --seed 0 \
    --name water-flow --version 1.0.0 --out runs/water-flow -q
$PY -m forecaster export runs/water-flow --out models/water-flow
cp runs/water-flow/report.json models/water-flow/report.json
cp runs/water-flow/loss.png models/water-flow/loss.png
$PY -m forecaster evaluate models/water-flow data/water-flow.csv --from 1014 \
    --predictions models/water-flow/holdout-predictions.csv --plot models/water-flow/holdout.png

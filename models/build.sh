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

# The seed lesson's event classifier: LSTM(128) over windows of 10 readings, sigmoid output,
# weighted BCE, Adam, batch 32, 10 epochs; the last 20 % of data/yahoo.csv is held out.
$PY -m forecaster train data/yahoo.csv --mode window --window 10 --cell lstm --hidden 128 \
    --task classify --label-column label --epochs 10 --batch-size 32 --seed 0 \
    --name yahoo-anomaly --version 1.0.0 --out runs/yahoo-anomaly -q
$PY -m forecaster export runs/yahoo-anomaly --out models/yahoo-anomaly
cp runs/yahoo-anomaly/report.json models/yahoo-anomaly/report.json
cp runs/yahoo-anomaly/loss.png models/yahoo-anomaly/loss.png
$PY -m forecaster evaluate models/yahoo-anomaly data/yahoo.csv --from 800 \
    --predictions models/yahoo-anomaly/holdout-predictions.csv

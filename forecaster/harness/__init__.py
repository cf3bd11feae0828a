"""Run the real thing on one machine: a private mosquitto, ``forecaster serve`` as a subprocess
and an MQTT collector, for the tests, the benchmarks and the demo.

One copy of the plumbing every one of them needs (free ports, waiting for a port or ``/readyz``,
a generated broker config, a daemon config written from the :class:`~forecaster.serve.config.Config`
model, scraping ``/metrics`` strictly, collecting predictions), so a fix to it is made once.
It ships in the wheel because ``forecaster.demo`` uses it; it never imports torch.

    from forecaster.harness import Broker, Collector, DaemonProcess, local_config

    with Broker(workdir / "broker") as broker:
        cfg = local_config(broker.port, bundle=models / "water-flow", state_dir=workdir / "state")
        with DaemonProcess(cfg, workdir) as daemon, Collector(broker.port) as sub:
            ...  # publish, then sub.wait_for(n); daemon.metric("forecaster_predictions_total")
"""

from forecaster.harness.broker import Broker, mosquitto_binary
from forecaster.harness.collect import Collector, mqtt_client, predictions
from forecaster.harness.daemon import (
    DaemonProcess,
    MetricNotFound,
    local_config,
    parse_metric,
    write_config,
)
from forecaster.harness.ports import (
    HarnessError,
    free_port,
    free_ports,
    wait_file,
    wait_port,
    wait_until,
)

__all__ = [
    "Broker",
    "Collector",
    "DaemonProcess",
    "HarnessError",
    "MetricNotFound",
    "free_port",
    "free_ports",
    "local_config",
    "mosquitto_binary",
    "mqtt_client",
    "parse_metric",
    "predictions",
    "wait_file",
    "wait_port",
    "wait_until",
    "write_config",
]

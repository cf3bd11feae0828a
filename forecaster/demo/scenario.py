"""What the demo replays: which real series, through which model, with which anomaly.

Three streams on two routes, each a different real series: two water pipes served by the
bundled ``water-flow`` LSTM (the second one with an injected burst that the live view should
flag), and the electricity demand of England and Wales served by ``taylor-demand``. Each stream
replays its training rows first, as fast as possible (so every recurrent state is warm), then
its held-out rows live.

Where the files are: :func:`find_root` looks, in order, at ``--root`` (or
``$FORECASTER_DEMO_ROOT``), at ``<sys.prefix>/share/forecaster`` (where a wheel install puts
``models/`` and ``data/``: ``[tool.setuptools.data-files]`` in pyproject.toml), at the source
checkout the package was imported from (an editable install or ``python -m`` in a clone) and
at the current directory. The first that holds every file wins.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from forecaster.data import Dataset, load_csv
from forecaster.errors import ForecasterError
from forecaster.model.bundle import Manifest, read_manifest
from forecaster.replay import ReplayItem, plan


class DemoError(ForecasterError):
    """The demo cannot run or could not stop cleanly; the message is one line for the user."""


@dataclass(frozen=True)
class Feed:
    """One stream of the demo: a real series, the route (model) that serves it, its topic."""

    name: str
    route: str
    bundle: str  # directory under models/
    topic: str  # the reading topic; the route subscribes to ``filter``
    filter: str
    #: held-out position (0..1) and size of an injected burst, in multiples of the series'
    #: median one-step change (robust to its outages, unlike the standard deviation)
    inject_at: float | None = None
    inject_size: float = 0.0


FEEDS = (
    Feed("pipe-1", "water", "water-flow", "sensors/pipe-1/flow", "sensors/+/flow"),
    Feed(
        "pipe-2",
        "water",
        "water-flow",
        "sensors/pipe-2/flow",
        "sensors/+/flow",
        inject_at=0.45,
        inject_size=30.0,
    ),
    Feed("england-wales", "demand", "taylor-demand", "grid/england-wales/demand", "grid/+/demand"),
)


def _candidates(explicit: Path | None) -> list[Path]:
    out: list[Path] = []
    env = os.environ.get("FORECASTER_DEMO_ROOT")
    if explicit is not None:
        return [explicit]
    if env:
        return [Path(env)]
    out.append(Path(sys.prefix) / "share" / "forecaster")
    out.append(Path(__file__).resolve().parents[2])  # the checkout, for editable installs
    out.append(Path.cwd())
    return out


def needed(feeds: tuple[Feed, ...] = FEEDS) -> list[str]:
    """Relative paths the demo reads (the bundles' data files come from their manifests)."""
    return sorted({f"models/{f.bundle}/model.json" for f in feeds})


def find_root(explicit: Path | None = None, feeds: tuple[Feed, ...] = FEEDS) -> Path:
    """The first candidate folder with every bundle and data file the demo needs."""
    tried = _candidates(explicit)
    for root in tried:
        if all((root / rel).is_file() for rel in needed(feeds)):
            manifests = [read_manifest(root / "models" / f.bundle) for f in feeds]
            if all((root / "data" / m.training_data.source).is_file() for m in manifests):
                return root
    where = ", ".join(str(p) for p in tried)
    raise DemoError(
        f"the demo's models/ and data/ are not in {where}: run it from a clone of the "
        "repository or pass --root DIR (a folder holding models/ and data/)"
    )


@dataclass
class Stream:
    """One feed, resolved: its bundle, its data and the readings to replay."""

    feed: Feed
    bundle_dir: Path
    manifest: Manifest
    data: Dataset
    warm: list[ReplayItem]
    live: list[ReplayItem]
    injected_rows: list[int]


def load(root: Path, feeds: tuple[Feed, ...] = FEEDS) -> list[Stream]:
    """Every feed's replay plan: training rows, then held-out rows (with its anomaly)."""
    out = []
    for feed in feeds:
        bundle_dir = root / "models" / feed.bundle
        manifest = read_manifest(bundle_dir)
        td = manifest.training_data
        if td.until is None:
            raise DemoError(f"{bundle_dir} records no training cut (until): nothing held out")
        data = load_csv(root / "data" / td.source, td.column, td.time_column, td.stream_column)
        if len(data.series) != 1:
            raise DemoError(f"{td.source}: the demo replays one series per feed")
        warm = _rename(plan(data, feed.topic, 1, None, td.until), feed)
        live = _rename(plan(data, feed.topic, 1, td.until, None), feed)
        if not live:
            raise DemoError(f"{td.source} has no rows at or after {td.until}: nothing held out")
        injected: list[int] = []
        if feed.inject_at is not None:
            live, injected = inject(live, feed.inject_at, feed.inject_size * _typical_step(warm))
        out.append(Stream(feed, bundle_dir, manifest, data, warm, live, injected))
    return out


def _rename(items: list[ReplayItem], feed: Feed) -> list[ReplayItem]:
    return [dataclasses.replace(it, stream=feed.name, topic=feed.topic) for it in items]


def _typical_step(items: list[ReplayItem]) -> float:
    """The median absolute change from one reading to the next."""
    steps = sorted(abs(b.value - a.value) for a, b in itertools.pairwise(items))
    return steps[len(steps) // 2] if steps else 1.0


def inject(
    items: list[ReplayItem], at: float, size: float, length: int = 3
) -> tuple[list[ReplayItem], list[int]]:
    """A burst: ``length`` readings raised by ``size`` from position ``at`` (0..1) on."""
    start = min(len(items) - 1, int(at * len(items)))
    out = list(items)
    rows = []
    for i in range(start, min(len(items), start + length)):
        out[i] = dataclasses.replace(items[i], value=items[i].value + size)
        rows.append(items[i].row)
    return out, rows


def interleave(groups: list[list[ReplayItem]]) -> list[ReplayItem]:
    """All streams' readings in one publishing order in which every stream progresses at the
    same pace through its own list, so they start and end together whatever their lengths."""
    keyed = [((i + 1) / len(g), k, it) for k, g in enumerate(groups) for i, it in enumerate(g) if g]
    keyed.sort(key=lambda t: (t[0], t[1]))
    seq = [it for _, _, it in keyed]
    return [dataclasses.replace(it, seq=n) for n, it in enumerate(seq)]

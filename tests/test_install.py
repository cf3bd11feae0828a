"""The server install recipe (scripts/install-server.sh), run as written into a temporary root.

``DESTDIR`` makes the script treat a temporary folder as ``/``: the venv is created and the
package installed under it (from this clone, serving install only), the unit, config, bundles
and credential file land where the README says, and nothing is started. The test then checks
what a fresh Debian machine would have: a working ``/usr/local/bin/forecaster``, verified
world-readable bundles, no PyTorch, and a unit that ``systemd-analyze verify`` accepts with its
ExecStart pointing at the installed command.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-server.sh"


def _run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=600, check=False, **kw
    )  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("root")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    res = _run("bash", str(SCRIPT), env={**env, "DESTDIR": str(dest)})
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    assert "not starting anything" in res.stderr
    return dest


def test_the_command_runs_from_usr_local_bin(installed: Path) -> None:
    cmd = installed / "usr" / "local" / "bin" / "forecaster"
    assert cmd.is_symlink()
    res = _run(str(cmd), "--version")
    assert res.returncode == 0 and res.stdout.startswith("forecaster "), res.stderr
    # The venv is the serving install: no PyTorch.
    py = installed / "opt" / "forecaster" / "bin" / "python"
    assert _run(str(py), "-c", "import torch").returncode != 0


def test_bundles_are_world_readable_and_verify(installed: Path) -> None:
    models = installed / "usr" / "share" / "forecaster" / "models"
    cmd = installed / "usr" / "local" / "bin" / "forecaster"
    for name in ("water-flow", "taylor-demand"):
        for f in (models / name).iterdir():
            assert f.stat().st_mode & stat.S_IROTH, f"{f} is not world-readable"
        res = _run(str(cmd), "inspect", str(models / name))
        assert res.returncode == 0 and "(verified)" in res.stdout, res.stderr


def test_config_and_credential_files(installed: Path) -> None:
    etc = installed / "etc" / "forecaster"
    assert (etc / "forecaster.toml").read_text() == (
        ROOT / "deploy" / "forecaster.toml"
    ).read_text()
    assert stat.S_IMODE((etc / "mqtt-password").stat().st_mode) == 0o600
    # The example config names the bundle where step 3 put it.
    assert (
        'bundle = "/usr/share/forecaster/models/water-flow"'
        in (etc / "forecaster.toml").read_text()
    )


@pytest.mark.parametrize("name", ["forecaster.service", "forecaster@.service"])
def test_installed_units_verify(installed: Path, tmp_path: Path, name: str) -> None:
    """The single-process unit and the NATS workers' template, each as the repository has it;
    the template verified through an instance, as `systemctl enable forecaster@0` starts it."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: apt-get install systemd (make test does it)")
    unit = installed / "etc" / "systemd" / "system" / name
    assert unit.read_text() == (ROOT / "systemd" / name).read_text()
    # verify checks that ExecStart's binary is executable: point it at the staged one.
    staged = tmp_path / name
    staged.write_text(
        unit.read_text().replace(
            "ExecStart=/usr/local/bin/forecaster ",
            f"ExecStart={installed}/usr/local/bin/forecaster ",
        )
    )
    target = staged
    if name.endswith("@.service"):
        target = tmp_path / name.replace("@.", "@0.")
        target.symlink_to(staged)
    res = _run(analyze, "verify", str(target))
    assert res.returncode == 0, res.stderr
    assert (res.stdout + res.stderr).strip() == "", res.stdout + res.stderr


@pytest.mark.parametrize("workers", ["0", "two", "-1"])
def test_a_bad_worker_count_is_refused_before_anything_is_installed(
    workers: str, tmp_path: Path
) -> None:
    res = _run(
        "bash", str(SCRIPT), env={**os.environ, "DESTDIR": str(tmp_path), "WORKERS": workers}
    )
    assert res.returncode == 2, res.stderr
    assert "WORKERS must be a positive number" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_demo_finds_its_files_in_the_installed_package(installed: Path) -> None:
    """From a wheel, outside any clone: models/ and data/ come from <prefix>/share/forecaster."""
    py = installed / "opt" / "forecaster" / "bin" / "python"
    code = (
        "from forecaster.demo.scenario import find_root, load; r = find_root(); load(r); print(r)"
    )
    env = {k: v for k, v in os.environ.items() if k != "FORECASTER_DEMO_ROOT"}
    res = _run(str(py), "-c", code, cwd="/", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(installed / "opt" / "forecaster" / "share" / "forecaster")

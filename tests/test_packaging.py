"""The package as it ships: the wheel, installed in a fresh venv away from the checkout,
runs `hydrod --help` and `hydrod migrate`; and the development install exposes only
the package, not tests/, bench/ or scripts/."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

from harness import fast_config, free_port, query, to_toml

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_installed_in_a_fresh_venv_runs_help_and_migrate(tmp_path, database):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Built with this venv's setuptools: an isolated build env would be fetched every time.
    built = run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", ROOT,
                cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("hydrod-*.whl")

    fresh = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", fresh, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    installed = run(*pip, "--python", fresh / "bin" / "python", "install", "-q", "--no-deps", "--no-index",
                    wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    # The dependencies come from this venv, to stay fast and offline: a .pth puts its
    # site-packages after the fresh venv's own. The development install of hydrod in
    # there is not seen: .pth files are read from site directories only.
    [fresh_site] = (fresh / "lib").glob("python3*/site-packages")
    (fresh_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    checked = run(*pip, "--python", fresh / "bin" / "python", "check", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # every Requires-Dist is there

    where = run(fresh / "bin" / "python", "-c", "import hydrod; print(hydrod.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(fresh_site), where.stdout

    # The page and everything it loads (SPEC §8: no CDN), with the chart library's licence.
    shipped_web = sorted(path.name for path in (ROOT / "web").iterdir())
    assert sorted(path.name for path in (fresh_site / "hydrod" / "web").iterdir()) == shipped_web
    assert {"index.html", "app.js", "uPlot.iife.min.js", "uPlot.LICENSE"} <= set(shipped_web)

    helped = run(fresh / "bin" / "hydrod", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "usage: hydrod" in helped.stdout, helped.stderr

    config = tmp_path / "config.toml"
    config.write_text(to_toml(fast_config(free_port(), database, free_port())))
    migrated = run(fresh / "bin" / "hydrod", "migrate", "--config", config, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    applied = [row[0] for row in query(database, "SELECT version FROM schema_migrations ORDER BY version")]
    shipped = sorted(path.name for path in (ROOT / "migrations").glob("*.sql"))
    assert len(applied) == len(shipped) > 0, (applied, shipped)


def test_the_development_install_exposes_the_package_and_not_the_checkout(tmp_path):
    probe = ("import importlib.util as u\n"
             "for name in ('hydrod', 'hydrod.actors', 'hydrod.core', 'hydrod.tests', 'hydrod.bench', 'hydrod.scripts'):\n"
             "    print(name, u.find_spec(name) is not None)\n")
    found = run(sys.executable, "-c", probe, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split("\n")[:6] == ["hydrod True", "hydrod.actors True", "hydrod.core True", "hydrod.tests False",
                                            "hydrod.bench False", "hydrod.scripts False"]

"""
The twistd plugin is found after a plain ``pip install .`` outside the source tree
(STYLE.md §C): the wheel must carry ``twisted/plugins/iii_plugin.py`` and no
``twisted/plugins/__init__.py``; and the web console's static assets.
"""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _run(args, **kwargs):
    """Run a subprocess; on failure the assertion shows its stderr (and stdout)."""
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, "%s exited %d\nstdout:\n%s\nstderr:\n%s" % (
        args[:4], result.returncode, result.stdout, result.stderr)
    return result


def test_wheel_ships_the_dropin_and_twistd_finds_it(tmp_path):
    """Build a wheel, install it alone into a fresh target, and ask twistd from elsewhere."""
    # Build from a clean copy: a stale build/ directory can smuggle the dropin in.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", ".git", "__pycache__", "dropin.cache", ".venv*", "data"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
          str(source)], cwd=str(tmp_path))
    [wheel] = list(wheels.iterdir())
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/iii_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert not any(name.endswith("dropin.cache") for name in names)
    # The web console's assets ship inside the package (no Node toolchain to install).
    static = os.path.join(ROOT, "iii_twisted", "modules", "console", "static")
    assets = sorted(os.listdir(static))
    assert {"index.html", "app.js", "style.css"} <= set(assets)
    for asset in assets:
        assert "iii_twisted/modules/console/static/" + asset in names
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
          str(target), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy is importable: the source tree (the checkout itself and an
    # editable install's link tree under build/) is not on the path. A virtualenv made in
    # the checkout, as README says, stays: it holds Twisted.
    env = dict(os.environ, PYTHONPATH=str(target))
    code = ("import sys, os; root = %r; "
            "sys.path = [p for p in sys.path if not (os.path.abspath(p or '.') == root or "
            "(p.startswith(root + os.sep) and not p.startswith(sys.prefix + os.sep)))]; "
            "from twisted.plugin import getPlugins; from twisted.application.service import "
            "IServiceMaker; import iii_twisted; "
            "print(iii_twisted.__file__); print([p.tapname for p in getPlugins(IServiceMaker)])"
            % ROOT)
    result = _run([sys.executable, "-c", code], cwd=str(elsewhere), env=env)
    module_file, tapnames = result.stdout.splitlines()[-2:]
    assert module_file.startswith(str(target))
    assert "'iii'" in tapnames

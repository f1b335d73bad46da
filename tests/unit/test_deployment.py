"""
The deployment files (Dockerfile, .dockerignore, deploy/iii-twisted.service) are linted
here, always: parsed and checked for what docs/deployment.rst promises (slim base,
non-root user, health check, foreground ``twist iii``, SIGTERM, hardening). Where the
tools exist they are also run: ``systemd-analyze verify`` on the unit, and ``docker
build`` of the image when a Docker daemon answers (CI has none; the lint is the test
there, and ``docker build .`` is the manual check).
"""

import configparser
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def dockerfile_instructions(path):
    """@return: [(INSTRUCTION, argument text)] with continuation lines joined."""
    instructions, current = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            current += line
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    assert not current, "a continuation line runs off the end"
    return instructions


@pytest.fixture(scope="module")
def docker():
    return dockerfile_instructions(os.path.join(ROOT, "Dockerfile"))


def _stages(instructions):
    stages = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, rest))
    return stages


def test_dockerfile_final_stage_is_slim_non_root_and_healthchecked(docker):
    known = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK",
             "CMD", "VOLUME", "STOPSIGNAL"}
    assert {k for k, _ in docker} <= known
    final = _stages(docker)[-1]
    image = final[0][1].split()[0]
    assert image.startswith("python:") and image.endswith("-slim"), image
    user = [rest for k, rest in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    # Nothing after USER runs as root.
    after_user = final[[k for k, _ in final].index("USER"):]
    assert not any(k == "RUN" for k, _ in after_user)
    [health] = [rest for k, rest in final if k == "HEALTHCHECK"]
    assert "iii_twisted.healthcheck" in health and "--interval=" in health
    [cmd] = [rest for k, rest in final if k == "CMD"]
    import json
    assert json.loads(cmd)[:2] == ["twist", "iii"]  # exec form, foreground, text logs
    assert ("STOPSIGNAL", "SIGTERM") in final
    exposed = {p for k, rest in final if k == "EXPOSE" for p in rest.split()}
    assert {"49134", "3111"} <= exposed
    assert any(k == "ENV" and "PYTHONUNBUFFERED=1" in rest for k, rest in final)


def test_dockerfile_copies_only_what_exists_and_ignores_local_state(docker):
    for keyword, rest in docker:
        if keyword == "COPY" and not rest.startswith("--from"):
            sources = shlex.split(rest)[:-1]
            for source in sources:
                assert os.path.exists(os.path.join(ROOT, source)), source
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = {line.strip() for line in f if line.strip()}
    assert {".git", ".venv*", "build", "data"} <= ignored
    # The image's config is the root config, whose data paths are relative (they
    # resolve under WORKDIR, the volume).
    final = _stages(docker)[-1]
    assert ("WORKDIR", "/var/lib/iii") in final
    assert any(k == "VOLUME" and "/var/lib/iii" in rest for k, rest in final)


def test_healthcheck_module_runs():
    from iii_twisted import healthcheck

    assert healthcheck.main(["not a url"]) == 1  # the real probe: test_operator_logs.py


def _unit():
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(os.path.join(ROOT, "deploy", "iii-twisted.service"))
    return parser


def test_systemd_unit_runs_twist_as_a_user_and_drains_on_sigterm():
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["User"] not in ("root", "0")
    command = shlex.split(service["ExecStart"])
    assert os.path.basename(command[0]) == "twist" and command[1] == "iii"
    assert command[command.index("--config") + 1].startswith("/etc/iii/")
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 5  # > the default shutdown_timeout_ms
    assert "HUP" in service["ExecReload"]
    assert service["Restart"] == "on-failure"
    assert service["WorkingDirectory"] == "/var/lib/iii"
    assert service["StateDirectory"] == "iii"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/iii"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt-get install systemd)")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    """The unit with ExecStart pointed at this environment's twist passes verify."""
    twist = os.path.join(os.path.dirname(sys.executable), "twist")
    with open(os.path.join(ROOT, "deploy", "iii-twisted.service")) as f:
        text = f.read().replace("/opt/iii-twisted/bin/twist", twist)
    unit = tmp_path / "iii-twisted.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "iii-twisted.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def _docker_daemon():
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _docker_daemon(), reason="no Docker daemon: the Dockerfile is "
                    "linted above; build it by hand with `docker build .`")
def test_docker_image_builds():
    result = subprocess.run(["docker", "build", "-q", "-t", "iii-twisted:test", ROOT],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]

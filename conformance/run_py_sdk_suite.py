#!/usr/bin/env python3
"""
Run the official Python SDK test suite (PyPI ``iii-sdk`` 0.10.0, its sdist's
``tests/``) against this checkout's engine, and print ``N passed, M failed, K skipped``
as the very last line.

Steps (../shared/spec/conformance.md):

1. download the ``iii-sdk`` sdist with pip and lay it out as in the upstream monorepo
   (``<work>/sdk/packages/python/iii``) beside a synthetic
   ``<work>/sdk/test-assets/handbook.pdf`` (the upload tests read it);
2. build a virtualenv with the sdist's ``[dev]`` extra, pinned to the versions of the
   sdist's ``uv.lock`` (what upstream CI used), plus pytest-timeout; the venv is
   cached between runs (``--venv``; ``--fresh`` rebuilds it);
3. start our engine from the checkout: ``twistd -n --pidfile= iii --config CONFIG``
   with the ``twistd`` beside the running interpreter (or beside ``--engine-python``,
   e.g. a PyPy venv's: the SDK needs Python >= 3.10, the engine runs on PyPy 3.9), in
   its own process group, the checkout first on ``PYTHONPATH``;
4. wait for its worker and HTTP ports, run pytest with ``III_URL``/``III_HTTP_URL``
   and a per-test timeout, then stop the engine (its whole process group);
5. count from pytest's JUnit report; a test skipped with "III engine not available"
   counts as failed. On any failure, the tail of the engine log is printed.

Exit status: 0 when something passed and nothing failed; 1 when a test failed or none
ran; 2 when the suite could not be set up; 3 when the engine did not start.

Usage::

    python conformance/run_py_sdk_suite.py                      # the whole suite
    python conformance/run_py_sdk_suite.py tests/test_bridge.py # pytest args
    python conformance/run_py_sdk_suite.py --config /tmp/me/trimmed.yaml -- -k state
    python conformance/run_py_sdk_suite.py --engine-python .venv-pypy/bin/python

Standard library only: it runs in any environment where this package is installed.
"""

import argparse
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
DEFAULT_CONFIG = os.path.join(HERE, "sdk-suite-config.yaml")
ENGINE_SKIP = "engine not available"

# Exit codes.
OK, TESTS_FAILED, SETUP_FAILED, ENGINE_FAILED = 0, 1, 2, 3


class SetupError(Exception):
    """The suite could not be prepared; C{code} is the exit status."""

    def __init__(self, message, code=SETUP_FAILED):
        Exception.__init__(self, message)
        self.code = code


def log(message):
    print("[py-sdk-suite] " + message, file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # so pytest options are never taken for abbreviations
        description=__doc__.split("\n\n")[0],
        epilog="Arguments not recognised here are passed to pytest (e.g. a test file, "
               "-k EXPR); put them after -- if they look like options of this script.")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="engine config (default: conformance/sdk-suite-config.yaml)")
    parser.add_argument("--sdk-version", default="0.10.0")
    parser.add_argument("--ws-url", default=os.environ.get("III_URL", "ws://localhost:49199"))
    parser.add_argument("--http-url",
                        default=os.environ.get("III_HTTP_URL", "http://localhost:3199"))
    parser.add_argument("--per-test-timeout", type=int, default=90,
                        help="seconds per test (two SDK unit tests take 30 s by design)")
    parser.add_argument("--suite-timeout", type=int, default=1800,
                        help="seconds for the whole pytest run")
    parser.add_argument("--start-timeout", type=float, default=60.0,
                        help="seconds to wait for the engine's ports")
    parser.add_argument("--venv", default=None,
                        help="virtualenv for the suite, reused when it was built for the "
                             "same sdist and pins (default: ~/.cache/iii-twisted/"
                             "py-sdk-suite-VERSION)")
    parser.add_argument("--fresh", action="store_true",
                        help="rebuild the suite's virtualenv even if it is up to date")
    parser.add_argument("--unpinned", action="store_true",
                        help="install the latest test deps instead of the uv.lock pins")
    parser.add_argument("--pdf-kb", type=int, default=1024,
                        help="size of the synthetic handbook.pdf in KiB")
    parser.add_argument("--engine-python", default=sys.executable,
                        help="the Python whose twistd runs the engine (default: the one "
                             "running this script), e.g. a PyPy venv's bin/python; the "
                             "suite's own venv is built from the Python running this script")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--known-failures", default=None,
                        help="a file of the tests this engine is known to fail, one "
                             "JUnit id (classname::name, * wildcards) and its reason per "
                             "line: the run then passes when exactly those fail")
    parser.add_argument("--log-lines", type=int, default=60,
                        help="engine log lines shown on failure")
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    args.pytest_args = [a for a in pytest_args if a != "--"]
    args.config = os.path.abspath(args.config)
    if args.known_failures is not None:
        args.known_failures = os.path.abspath(args.known_failures)
    if args.venv is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        args.venv = os.path.join(cache, "iii-twisted", "py-sdk-suite-" + args.sdk_version)
    return args


# -- processes -----------------------------------------------------------------------

def run(cmd, log_path, **kwargs):
    """Run C{cmd} to completion with output to C{log_path}; @return: its exit code."""
    with open(log_path, "ab") as out:
        return subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, **kwargs)


def stop_group(process, what, timeout=10.0):
    """SIGTERM a process group we started, then SIGKILL it if it lingers."""
    if process is None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        process.wait()
        return
    log("stopping {} (process group {})".format(what, process.pid))
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        log("{} still alive after {:.0f}s; SIGKILL".format(what, timeout))
    # The leader may be gone while children linger: kill whatever is left.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def host_port(url):
    parts = urlsplit(url)
    default = 443 if parts.scheme in ("wss", "https") else 80
    return parts.hostname or "localhost", parts.port or default


def port_open(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def tail(path, lines):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return "(no log: {})\n".format(e)


# -- the SDK and its venv ------------------------------------------------------------

def fetch_sdist(python, version, work):
    """Download and unpack the sdist; @return: the SDK dir in the monorepo layout."""
    dl = os.path.join(work, "dl")
    log("downloading iii-sdk=={} sdist".format(version))
    rc = run([python, "-m", "pip", "--disable-pip-version-check", "download", "--no-deps",
              "--no-binary", ":all:", "iii-sdk==" + version, "-d", dl],
             os.path.join(work, "pip-download.log"))
    if rc != 0:
        sys.stderr.write(tail(os.path.join(work, "pip-download.log"), 30))
        raise SetupError("pip download failed")
    name = "iii_sdk-{}".format(version)
    sdist = os.path.join(dl, name + ".tar.gz")
    if not os.path.exists(sdist):
        raise SetupError("no {}.tar.gz in {}".format(name, dl))
    extract = os.path.join(work, "extract")
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(extract, filter="data")
        else:  # Python < 3.10.12 / 3.11.4
            archive.extractall(extract)
    # tests/test_api_triggers.py looks for <root>/sdk/test-assets/handbook.pdf, five
    # levels above itself, as in the upstream monorepo.
    sdk_dir = os.path.join(work, "sdk", "packages", "python", "iii")
    os.makedirs(os.path.dirname(sdk_dir))
    shutil.move(os.path.join(extract, name), sdk_dir)
    if not os.path.isdir(os.path.join(sdk_dir, "tests")):
        raise SetupError("the sdist has no tests/ folder")
    return sdk_dir


def make_test_pdf(work, kb):
    """
    Write a synthetic stand-in for upstream's handbook.pdf: the tests only compare
    bytes and sizes, so a PDF-looking blob with non-UTF-8 content does (its size,
    over 1 MiB by default, is what exercises the chunking of request bodies).
    """
    assets = os.path.join(work, "sdk", "test-assets")
    os.makedirs(assets, exist_ok=True)
    path = os.path.join(assets, "handbook.pdf")
    with open(path, "wb") as f:
        f.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + os.urandom(max(kb, 1) * 1024)
                + b"\n%%EOF\n")
    log("test asset {} ({} bytes)".format(path, os.path.getsize(path)))


def lock_pins(uv_lock):
    """@return: C{{name: version}} of every package in a uv.lock but the SDK itself."""
    with open(uv_lock, encoding="utf-8") as f:
        text = f.read()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pins = dict(re.findall(
            r'\[\[package\]\]\s*\nname = "([^"]+)"\s*\nversion = "([^"]+)"', text))
    else:
        pins = {p["name"]: p["version"] for p in tomllib.loads(text).get("package", [])
                if "version" in p}
    pins.pop("iii-sdk", None)  # the project itself, at a stale version
    return pins


def ensure_venv(args, sdk_dir, work):
    """
    Build (or reuse) the suite's venv with ``iii-sdk[dev]`` from the sdist.

    @return: the venv's python.
    """
    constraints = ""
    uv_lock = os.path.join(sdk_dir, "uv.lock")
    if not args.unpinned and os.path.exists(uv_lock):
        pins = lock_pins(uv_lock)
        constraints = "".join("{}=={}\n".format(n, v) for n, v in sorted(pins.items()))
    with open(os.path.join(sdk_dir, "pyproject.toml"), "rb") as f:
        pyproject = f.read()
    stamp_text = "{}\n{}\n{}\n".format(
        sys.version, hashlib.sha256(pyproject).hexdigest(),
        hashlib.sha256(constraints.encode()).hexdigest())
    venv = args.venv
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".iii-suite-stamp")
    if not args.fresh and os.path.exists(python) and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read() == stamp_text:
                log("reusing the suite venv {}".format(venv))
                return python
    if os.path.exists(venv):
        shutil.rmtree(venv)
    started = time.monotonic()
    log("creating the suite venv {} ({})".format(venv, sys.version.split()[0]))
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    install_log = os.path.join(work, "pip-install.log")
    if run([sys.executable, "-m", "venv", venv], install_log) != 0:
        sys.stderr.write(tail(install_log, 30))
        raise SetupError("venv creation failed")
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "-q"]
    target = sdk_dir + "[dev]"
    if constraints:
        constraints_path = os.path.join(work, "constraints.txt")
        with open(constraints_path, "w") as f:
            f.write(constraints)
        log("installing iii-sdk[dev] pinned to uv.lock ({} pins)".format(
            constraints.count("\n")))
        rc = run(pip + ["-c", constraints_path, target], install_log)
        if rc != 0:
            sys.stderr.write(tail(install_log, 15))
            log("the pinned install failed; installing unpinned")
            rc = run(pip + [target], install_log)
    else:
        log("installing iii-sdk[dev] unpinned")
        rc = run(pip + [target], install_log)
    if rc != 0 or run(pip + ["pytest-timeout"], install_log) != 0:
        sys.stderr.write(tail(install_log, 30))
        raise SetupError("installing the suite's dependencies failed")
    with open(stamp, "w") as f:
        f.write(stamp_text)
    log("suite venv ready in {:.0f}s".format(time.monotonic() - started))
    return python


# -- the engine ----------------------------------------------------------------------

def twistd_path(python):
    """@return: the command of the twistd of the Python environment of C{python}."""
    candidate = os.path.join(os.path.dirname(python), "twistd")
    if os.path.exists(candidate):
        return [candidate]
    return [python, "-m", "twisted.scripts.twistd"]


def start_engine(args, work, ws, http):
    """
    Start the engine (wait for its ports with L{wait_for_engine}).

    @return: the engine's C{Popen} (leader of its own process group).
    @raise SetupError: if a port is taken already.
    """
    if not os.path.exists(args.config):
        raise SetupError("no config file {}".format(args.config))
    for host, port in (ws, http):
        if port_open(host, port):
            raise SetupError(
                "{}:{} is in use before the engine started: refusing to test an unknown "
                "engine (another run? use flock /tmp/iii-suite.lock)".format(host, port),
                ENGINE_FAILED)
    cmd = twistd_path(args.engine_python) + ["-n", "--pidfile=", "iii", "--config", args.config]
    env = dict(os.environ)
    # This checkout first, so its modules (and its twisted/plugins dropin) are the ones
    # that run, whatever else the environment has installed.
    env["PYTHONPATH"] = os.pathsep.join(
        [CHECKOUT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    engine_dir = os.path.join(work, "engine")
    os.makedirs(engine_dir)
    engine_log = os.path.join(work, "engine.log")
    log("starting the engine in {}: {}".format(engine_dir, " ".join(cmd)))
    with open(engine_log, "ab") as out:
        engine = subprocess.Popen(cmd, cwd=engine_dir, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    return engine


def wait_for_engine(args, engine, ws, http):
    """
    Wait until the engine accepts TCP on its worker port, then on its HTTP port. The
    engine starts its modules before the worker port, so the HTTP port gets only a few
    more seconds, and a warning if it stays closed (a trimmed config may have no HTTP
    API).

    @raise SetupError: if the engine exits or does not open its worker port in time.
    """
    started = time.monotonic()
    for (host, port), timeout in ((ws, args.start_timeout), (http, 5.0)):
        deadline = time.monotonic() + timeout
        while not port_open(host, port):
            if engine.poll() is not None:
                raise SetupError("the engine exited (code {}) before listening on "
                                 "{}:{}".format(engine.returncode, host, port),
                                 ENGINE_FAILED)
            if time.monotonic() > deadline:
                if (host, port) == ws:
                    raise SetupError("the engine did not listen on {}:{} within {:.0f}s"
                                     .format(host, port, timeout), ENGINE_FAILED)
                log("WARNING: nothing listens on {}:{}: the HTTP API tests will fail"
                    .format(host, port))
                break
            time.sleep(0.1)  # polling a port for readiness
    log("engine (pid {}) listening after {:.1f}s".format(
        engine.pid, time.monotonic() - started))


# -- pytest --------------------------------------------------------------------------

def run_pytest(args, python, sdk_dir, work):
    """Run the suite, its output streamed to ours. @return: pytest's exit code."""
    junit = os.path.join(work, "junit.xml")
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEs",
           "--durations=15", "--junitxml=" + junit,
           "-o", "addopts=",  # drop the sdist's --cov options
           "-o", "asyncio_default_fixture_loop_scope=function",
           # A test file that cannot even be collected (a fixture the sdist does not
           # ship) is one failure, not the end of the run.
           "--continue-on-collection-errors",
           "--timeout={}".format(args.per_test_timeout)]
    if not any(a == "tests" or a.startswith("tests/") or a.endswith(".py") or "::" in a
               for a in args.pytest_args):
        cmd.append("tests")
    if args.known_failures is not None:
        for path, reason in read_known_failures(args.known_failures)[1]:
            log("not run: {} ({})".format(path, reason))
            cmd.append("--ignore=" + path)
    cmd += args.pytest_args
    env = dict(os.environ, III_URL=args.ws_url, III_HTTP_URL=args.http_url)
    env.setdefault("III_TELEMETRY_ENABLED", "false")
    env.pop("PYTHONPATH", None)
    log("running pytest in {}".format(sdk_dir))
    sys.stdout.flush()
    process = subprocess.Popen(cmd, cwd=sdk_dir, env=env, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        return process.wait(args.suite_timeout)
    except subprocess.TimeoutExpired:
        log("WARNING: the suite ran over {}s; stopping it".format(args.suite_timeout))
        return None
    finally:
        if process.poll() is None:
            stop_group(process, "pytest")


def read_known_failures(path):
    """
    @return: C{(known, ignored)} from a known-failures file: C{known} the
        C{[(pattern, reason)]} of its ``classname::name  # reason`` lines (``*``
        matches anything), C{ignored} the C{[(path, reason)]} of its
        ``ignore tests/file.py  # reason`` lines (files not run at all: every test
        in them needs what this engine lacks and each waits out a timeout first).
        Blank lines and lines starting with ``#`` are comments.
    """
    known, ignored = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            pattern, _, reason = line.partition("#")
            pattern, reason = pattern.strip(), reason.strip()
            if pattern.startswith("ignore "):
                ignored.append((pattern[len("ignore "):].strip(), reason))
            else:
                known.append((pattern, reason))
    return known, ignored


def check_known(failed_ids, passed_ids, known):
    """
    Compare a run's failures with the known ones (L{read_known_failures}).

    @return: C{(unexpected, fixed)}: failed tests no pattern covers, and entries
        that no failure matched (an exact one whose test passed, or a pattern none
        of whose tests failed).
    """
    from fnmatch import fnmatchcase
    unexpected = [t for t in failed_ids
                  if not any(fnmatchcase(t, pattern) for pattern, _ in known)]
    fixed = [p for p, _ in known
             if not any(fnmatchcase(t, p) for t in failed_ids)
             and ("*" in p or p in passed_ids)]
    return unexpected, fixed


def count(junit_path, ids=None):
    """
    @param ids: a dict to fill with C{"failed"} and C{"passed"} lists of test ids
        (``classname::name``), or None.
    @return: C{(passed, failed, skipped, engine_skips)} from a JUnit report; a skip
        saying the engine was not available is counted as failed (and in
        C{engine_skips}).
    """
    passed = failed = skipped = engine_skips = 0
    if ids is not None:
        ids.setdefault("failed", [])
        ids.setdefault("passed", [])
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        test_id = "{}::{}".format(case.get("classname") or "", case.get("name") or "")
        if ("failure" in tags or "error" in tags) and ids is not None:
            ids["failed"].append(test_id)
        elif not tags & {"failure", "error", "skipped"} and ids is not None:
            ids["passed"].append(test_id)
        if "failure" in tags or "error" in tags:
            failed += 1
        elif "skipped" in tags:
            reason = " ".join((c.get("message") or "") + (c.text or "")
                              for c in case if c.tag == "skipped")
            if ENGINE_SKIP in reason:
                engine_skips += 1
                failed += 1
            else:
                skipped += 1
        else:
            passed += 1
    return passed, failed, skipped, engine_skips


# -- main ----------------------------------------------------------------------------

def _terminate(signum, frame):
    raise KeyboardInterrupt()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    work = tempfile.mkdtemp(prefix="iii-py-sdk-suite.")
    engine = None
    engine_log = os.path.join(work, "engine.log")
    passed = failed = skipped = 0
    code = SETUP_FAILED
    show_log = False
    try:
        ws, http = host_port(args.ws_url), host_port(args.http_url)
        log("work dir {}; engine config {}".format(work, args.config))
        sdk_dir = fetch_sdist(sys.executable, args.sdk_version, work)
        make_test_pdf(work, args.pdf_kb)
        python = ensure_venv(args, sdk_dir, work)
        engine = start_engine(args, work, ws, http)
        wait_for_engine(args, engine, ws, http)
        started = time.monotonic()
        rc = run_pytest(args, python, sdk_dir, work)
        log("pytest exited with {} after {:.0f}s".format(rc, time.monotonic() - started))
        if engine.poll() is not None:
            log("WARNING: the engine exited (code {}) during the run".format(
                engine.returncode))
            show_log = True
        junit = os.path.join(work, "junit.xml")
        if not os.path.exists(junit) or os.path.getsize(junit) == 0:
            log("pytest wrote no JUnit report (crashed or timed out)")
            code = TESTS_FAILED
        else:
            ids = {}
            passed, failed, skipped, engine_skips = count(junit, ids)
            if engine_skips:
                log("{} test(s) skipped with 'III engine not available' counted as "
                    "failed".format(engine_skips))
            code = OK if passed and not failed else TESTS_FAILED
            if args.known_failures is not None and passed:
                known = read_known_failures(args.known_failures)[0]
                unexpected, fixed = check_known(ids["failed"], set(ids["passed"]), known)
                for test_id in fixed:
                    log("NOTE: no failure matches {}; remove it from {}".format(
                        test_id, args.known_failures))
                for test_id in unexpected:
                    log("UNEXPECTED failure: {}".format(test_id))
                if unexpected:
                    show_log = True
                else:
                    log("all {} failure(s) are known ({})".format(
                        failed, os.path.basename(args.known_failures)))
                code = TESTS_FAILED if unexpected else OK
    except SetupError as e:
        log(str(e))
        code = e.code
    except KeyboardInterrupt:
        log("interrupted")
        code = TESTS_FAILED
    finally:
        stop_group(engine, "the engine")
        if engine is not None and (code != OK or show_log):
            log("engine log tail ({}):".format(engine_log))
            sys.stderr.write(tail(engine_log, args.log_lines))
        if args.keep_workdir:
            log("work dir kept: {}".format(work))
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.stderr.flush()
    print("{} passed, {} failed, {} skipped".format(passed, failed, skipped), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""
``python -m iii_twisted.healthcheck [URL]``: exit 0 when the engine answers its
readiness endpoint with 200, else 1 (a Docker ``HEALTHCHECK`` or a systemd
``ExecStartPost`` probe; the slim image has no curl).

URL defaults to ``$III_HEALTH_URL``, else ``http://127.0.0.1:3111/_iii/health/ready``
(the REST API port; use ``http://127.0.0.1:9464/health/ready`` for the Prometheus
port, or ``.../live`` for liveness only).

For a cluster member the line also gives the directory's state, e.g.
``200 http://...: cluster directory unreachable, 2 other members known`` (still exit
0: the member serves its own workers; docs/cluster.rst, "Membership and failure").
"""

import json

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:3111/_iii/health/ready"


def check(url, timeout=3.0):
    """@return: (ok, one line saying what the engine answered)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            line = "{} {}".format(response.status, url)
            return response.status == 200, line + _cluster_note(response.read(4096))
    except urllib.error.HTTPError as e:
        body = e.read(500).decode("utf-8", "replace")
        return False, "{} {}: {}".format(e.code, url, body)
    except (OSError, ValueError) as e:
        return False, "{}: {}".format(url, e)


def _cluster_note(body):
    try:
        cluster = json.loads(body.decode("utf-8")).get("cluster")
        unlinked = cluster.get("unlinked")
        return ": cluster directory {}, {} other members known{}".format(
            cluster["directory"], cluster["members"],
            ", no link to {}".format(", ".join(unlinked)) if unlinked else "")
    except (ValueError, AttributeError, KeyError, TypeError):
        return ""  # not a cluster member (or not the ready answer)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    url = argv[0] if argv else os.environ.get("III_HEALTH_URL", DEFAULT_URL)
    ok, line = check(url)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""
Plot bench/results/latest.json (written by bench/run.py) as one PNG.

Usage: ``python bench/plot.py RESULTS.json OUT.png`` (in the bench venv: matplotlib).
"""

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"iii": "#d62728", "crossbar": "#1f77b4", "crossbar-autobahn": "#aec7e8",
          "relay": "#2ca02c", "echo": "#7f7f7f", "floor": "#7f7f7f"}
NAMES = {"iii": "ours", "crossbar": "Crossbar", "crossbar-autobahn": "Crossbar (AB client)",
         "relay": "relay", "echo": "echo", "floor": "twisted.web echo"}


def series(results, section, key, target, field="rate"):
    runs = [r for r in results.get(section, {}).get(key, {}).get(target, [])
            if "error" not in r and (field == "cpu" or r.get(field) is not None)]
    if field == "cpu":
        xs = [r["server_cpu_s"] / r["calls"] * 1e6 for r in runs if r["calls"]]
    else:
        xs = [r[field] for r in runs]
    if not xs:
        return None, None, None
    return statistics.median(xs), min(xs), max(xs)


def bars(ax, labels, groups, targets, title, ylabel, log=False):
    width = 0.8 / len(targets)
    for i, target in enumerate(targets):
        meds, lo, hi = [], [], []
        for g in groups:
            m, a, b = g(target)
            meds.append(m or 0)
            lo.append((m - a) if m else 0)
            hi.append((b - m) if m else 0)
        xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, meds, width, yerr=[lo, hi], color=COLORS[target], label=NAMES[target],
               capsize=2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def main(path, out):
    with open(path) as f:
        data = json.load(f)
    r = data["results"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax = axes[0][0]
    bars(ax, ["p50", "p99"], [
        lambda t: series(r, "latency", "1x1", t, "p50_us"),
        lambda t: series(r, "latency", "1x1", t, "p99_us")],
        ["iii", "crossbar", "crossbar-autobahn", "relay", "echo"],
        "Sequential call latency (1 × 1, 70 B)", "µs")

    keys = [k for k in r.get("throughput", {}) if k.split("x")[0] == k.split("x")[1]]
    ax = axes[0][1]
    bars(ax, [k.replace("x", "×") for k in keys],
         [lambda t, k=k: series(r, "throughput", k if t != "echo" else
                                k.split("x")[0] + "x*", t) for k in keys],
         ["iii", "crossbar", "relay", "echo"], "Throughput, callers × workers (70 B)",
         "calls/s")

    ax = axes[0][2]
    bars(ax, [k.replace("x", "×") for k in keys],
         [lambda t, k=k: series(r, "throughput", k if t != "echo" else
                                k.split("x")[0] + "x*", t, "cpu") for k in keys],
         ["iii", "crossbar", "relay", "echo"], "Server CPU per call", "µs")

    sizes = ["1024", "10240", "102400"]
    ax = axes[1][0]
    bars(ax, ["70 B", "1 KB", "10 KB", "100 KB"],
         [lambda t: series(r, "throughput", "4x4" if t != "echo" else "4x*", t)] +
         [lambda t, s=s: series(r, "payload", s, t) for s in sizes],
         ["iii", "crossbar", "relay", "echo"], "Payload size (4 × 4)", "calls/s", log=True)

    ax = axes[1][1]
    http_targets = [t for t in ("iii", "crossbar", "floor")
                    if any(t in r.get("http", {}).get(k, {}) for k in ("1", "16", "64"))]
    bars(ax, ["1", "16", "64"],
         [lambda t, k=k: series(r, "http", k, t) for k in ("1", "16", "64")],
         http_targets, "HTTP request → function, by connections", "requests/s")

    ax = axes[1][2]
    ax.axis("off")
    sdk = data.get("sdk", {})
    text = ["Official SDK (iii-sdk 0.10.0) vs ours:"]
    if "error" in sdk:
        text.append("failed: {}".format(sdk["error"]))
    else:
        text += ["p50 {:,.0f} µs, p99 {:,.0f} µs".format(sdk["p50_us"], sdk["p99_us"]),
                 "1 caller: {:,.0f} calls/s".format(sdk["threads_1"]["rate"]),
                 "4 callers: {:,.0f} calls/s".format(sdk["threads_4"]["rate"])]
    info = data.get("info", {})
    text += ["", "{} ({} cores)".format(info.get("cpu", "?"), info.get("cores", "?")),
             "Python {}, Twisted {},".format(info.get("python"), info.get("twisted")),
             "Autobahn {}, Crossbar {}".format(info.get("autobahn"), info.get("crossbar")),
             "{} round(s); bars: median, whiskers: min–max".format(data.get("rounds"))]
    ax.text(0, 1, "\n".join(text), va="top", fontsize=10, family="monospace")
    fig.suptitle("iii-twisted benchmark")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

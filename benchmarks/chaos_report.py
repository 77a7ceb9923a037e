"""The chaos soak's verdict and its report (``CHAOS.md``, ``chaos.json``)."""

from __future__ import annotations

import json
import platform
from collections import Counter
from pathlib import Path
from typing import Any

from chaos_ops import http_status_of

import twinfer

#: RSS at the end may differ from the baseline by this fraction.
RSS_TOLERANCE = 0.10


def cross_check(result: dict[str, Any]) -> dict[str, Any]:
    """Compare, per front end, what the clients saw with the server's counts.

    Every request the server counted was answered to its client with the
    same outcome, or withdrawn by its client (the server then counted
    whatever it ended with: usually CANCELLED).  So per code the server's
    count is at least the clients' answers, and the surplus over all codes
    equals the withdrawn requests; the totals equal the requests sent.
    """
    checks = {}
    for frontend in sorted(set(result["sent"]) | set(result["server_counts"])):
        server: Counter[str] = Counter()
        for code, n in result["server_counts"].get(frontend, {}).items():
            server[http_status_of(code) if frontend == "http" else code] += n
        seen = Counter(result["answered"].get(frontend, {}))
        withdrawn = sum(result["withdrawn"].get(frontend, {}).values())
        sent = result["sent"].get(frontend, 0)
        short = {c: seen[c] - server[c] for c in seen if seen[c] > server[c]}
        surplus = sum(server[c] - seen[c] for c in server if server[c] > seen[c])
        checks[frontend] = {
            "sent": sent,
            "server_total": sum(server.values()),
            "answered": sum(seen.values()),
            "withdrawn": withdrawn,
            "server_surplus_over_answers": surplus,
            "answers_the_server_did_not_count": short,
            "ok": sum(server.values()) == sent and not short and surplus == withdrawn,
        }
    return checks


def verdict(result: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether the run passed, and one line per check."""
    lines = []
    checks = result["cross_check"]
    base, end = result["baseline"], result["end"]
    rss_change = (end["rss_mib"] - base["rss_mib"]) / base["rss_mib"]
    anomalies = {k: v for k, v in result["events"].items() if k.startswith("ANOMALY")}
    garbage = result["events"].get("binary garbage connections", 0)
    binary_refused = sum(
        n for key, n in result["protocol_errors"].items() if key.startswith("binary ")
    )
    unexpected = {k: v for k, v in result["server_log_errors"].items() if "injected fault" not in k}
    tests = [
        (result["unanswered"] == 0, f"unanswered requests: {result['unanswered']}"),
        (
            all(c["ok"] for c in checks.values()),
            "client counts match the server's twinfer_requests_total: "
            + ", ".join(f"{f} {'yes' if c['ok'] else 'NO'}" for f, c in checks.items()),
        ),
        (
            abs(rss_change) <= RSS_TOLERANCE,
            f"RSS {base['rss_mib']} -> {end['rss_mib']} MiB ({rss_change:+.1%}, limit "
            f"±{RSS_TOLERANCE:.0%})",
        ),
        (end["fds"] <= base["fds"], f"open fds {base['fds']} -> {end['fds']}"),
        (
            base["server_busy"] == 0 and end["server_busy"] == 0,
            "nothing in flight and no connection open at the quiet points",
        ),
        (
            binary_refused == garbage,
            f"binary garbage connections {garbage}, refused by the server as protocol errors "
            f"{binary_refused}",
        ),
        (not anomalies, f"client-side anomalies: {anomalies or 'none'}"),
        (
            not unexpected,
            f"exceptions in the server log other than the injected device faults: "
            f"{unexpected or 'none'}",
        ),
        (result["server_exit_status"] == 0, f"server exit status {result['server_exit_status']}"),
    ]
    for ok, line in tests:
        lines.append(f"{'PASS' if ok else 'FAIL'}: {line}")
    return all(ok for ok, _ in tests), lines


def write_report(result: dict[str, Any], out: Path) -> bool:
    """Write CHAOS.md and chaos.json into ``out``; print the verdict; returns whether it passed."""
    result["cross_check"] = cross_check(result)
    passed, lines = verdict(result)
    result["verdict"] = {"passed": passed, "checks": lines}
    result["versions"] = {"twinfer": twinfer.__version__, "python": platform.python_version()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "CHAOS.md").write_text(markdown(result))
    print("\n".join(lines))
    print(f"{'PASSED' if passed else 'FAILED'}; report in {out / 'CHAOS.md'}")
    return passed


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def markdown(result: dict[str, Any]) -> str:
    clients = result["clients"]
    out = [
        "# Chaos soak",
        "",
        f"`python benchmarks/chaos.py --minutes {result['minutes']:g}` (seed {result['seed']}), "
        f"on {result['cpu']}; twinfer {result['versions']['twinfer']}, "
        f"Python {result['versions']['python']}.",
        "",
        f"Load: {clients['binary']} binary connections with {clients['pipeline']} requests in "
        f"flight each and {clients['http']} KServe v2 HTTP connections (80 % `tiny`, 20 % "
        f"`squeezenet`), for the whole run, on devices `a` (a stand-in that fails on command) "
        f"and `b`; about {clients['vandals_per_s']:g} misbehaving connections a second; "
        f"warm-up {result['warmup_s']:g} s.",
        "",
        "## Verdict: " + ("PASSED" if result["verdict"]["passed"] else "FAILED"),
        "",
        *[f"- {line}" for line in result["verdict"]["checks"]],
        "",
        "## Requests",
        "",
        "| front end | sent | answered, by outcome | withdrawn by their own client | "
        "server's count | matches |",
        "|---|---:|---|---|---:|---|",
    ]
    for frontend, check in result["cross_check"].items():
        out.append(
            f"| {frontend} | {check['sent']} | {_counts(result['answered'].get(frontend, {}))} | "
            f"{_counts(result['withdrawn'].get(frontend, {}))} | {check['server_total']} "
            f"({_counts(result['server_counts'].get(frontend, {}))}) | "
            f"{'yes' if check['ok'] else 'NO'} |"
        )
    out += [
        "",
        f"Unanswered: **{result['unanswered']}**. HTTP outcomes are statuses (the server's "
        "codes are mapped through `twinfer.outcomes` to compare). A withdrawn request is "
        "counted by the server with whatever it ended with (mostly CANCELLED, OK when it "
        "finished first), so per outcome the server's count exceeds the answers by exactly "
        "the withdrawn requests.",
        "",
        "## Chaos",
        "",
        "| event | count |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in result["events"].items()],
        "",
        f"Server protocol errors (bytes refused before they were a request): "
        f"{_counts(result['protocol_errors'])}.",
        "",
        "Operations:",
        "",
        *[f"- {op['t']:7.1f} s {op['what']}: {op['result']}" for op in result["operations"]],
        "",
        "## Server process",
        "",
        "| | RSS MiB | threads | open fds |",
        "|---|---:|---:|---:|",
    ]
    for key in ("baseline", "end"):
        s = result[key]
        out.append(f"| {s['label']} ({s['t']} s) | {s['rss_mib']} | {s['threads']} | {s['fds']} |")
    series = result["samples"]
    out += [
        "",
        "Every 5 s (t, RSS MiB, fds): "
        + "; ".join(f"{s['t']:g} {s['rss_mib']} {s['fds']}" for s in series),
        "",
        "Exceptions the server logged with a traceback (the stand-in's `injected fault` is "
        "expected: one per inference that met the failed device):",
        "",
        *[f"- {n} x `{line}`" for line, n in result["server_log_errors"].items()],
        "",
    ]
    return "\n".join(out)

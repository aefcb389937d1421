"""The tables ``scripts/bench`` prints, and the figures it writes as JSON."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bench.envelope import envelope_cost_us
from bench.memory import import_costs

if TYPE_CHECKING:
    from bench.targets import Bench, Run
    from bench.wrk import WrkResult

# Busy time no benchmark process explains, in % of one core, above which a run
# is flagged as disturbed by other work on the machine.
NOISE_LIMIT = 20


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def report(bench: Bench, layout: str) -> tuple[dict[str, Any], int]:
    """Print the tables; return the figures and the exit status."""
    rounds = bench.args.rounds
    out: dict[str, Any] = {
        "wrk": asdict(bench.params),
        "rounds": rounds,
        "layout": layout,
        "workers": bench.args.workers,
        "targets": [],
    }
    print()
    if rounds > 1:
        print(f"Each row is the round with the median req/s of {rounds}; errors are summed.")
    header = f"{'target':<32}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"
    print(header)
    print("-" * len(header))
    status = 0
    medians: dict[str, Run] = {}
    for outcome in bench.outcomes:
        run = outcome.median
        entry: dict[str, Any] = {
            "name": outcome.name,
            "request": f"{outcome.method} {outcome.path}",
            "skipped": outcome.skipped,
            "failed": outcome.failed,
            "warmup_errors": outcome.warmup_errors,
            "runs": [asdict(r) for r in outcome.runs],
        }
        out["targets"].append(entry)
        if outcome.failed:
            status = 1
        if not outcome.wrk_row:
            if outcome.failed:
                print(f"{outcome.name:<32}  FAILED: {outcome.failed.splitlines()[0]}")
            continue
        if run is None:
            why = f"FAILED: {outcome.failed.splitlines()[0]}" if outcome.failed else "skipped:"
            print(f"{outcome.name:<32}  {why} {outcome.skipped or ''}")
            continue
        medians[outcome.name] = run
        r = run.result
        entry["median"] = asdict(run)
        print(
            f"{outcome.name:<32}{r.rps:>10,.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{r.max_ms:>9.2f}{outcome.errors:>8}"
        )
        if outcome.errors and status == 0:
            status = 3

    for outcome in bench.outcomes:
        for run in outcome.runs:
            if run.result.errors:
                print(
                    f"\n!!! {outcome.name}: {run.result.non_2xx} responses had a status >= 400 "
                    f"and the socket errors were {run.result.socket_errors or 'none'}: "
                    "these figures are NOT valid."
                )
        if outcome.warmup_errors:
            print(f"\n!!! {outcome.name}: {outcome.warmup_errors} errors during the warm-up.")
        if outcome.failed and "\n" in outcome.failed:
            print(f"\n!!! {outcome.name} FAILED:\n{outcome.failed}")
    if rounds > 1:
        print("\nreq/s of every round")
        for outcome in bench.outcomes:
            if outcome.runs:
                shown = ", ".join(f"{run.result.rps:,.0f}" for run in outcome.runs)
                print(f"  {outcome.name:<32}{shown}")

    print(
        "\nCPU during each measured run, in % of one core: the process under test (SUT) and"
        "\nits CPU time per request, the load side (wrk, upstreams: nginx + fake, redis), how"
        "\nbusy each core was, softirq (loopback TCP, charged to no process), 'other' (busy"
        "\ntime none of these explain: other work on the machine) and hypervisor steal"
    )
    print(
        f"{'target':<32}{'SUT':>6}{'us/req':>8}{'wrk':>6}{'upstr':>6}{'redis':>6}"
        f"{'cpu0':>6}{'cpu1':>6}{'sirq':>6}{'other':>6}{'steal':>6}"
    )

    def cell(value: float | None, width: int = 6) -> str:
        return f"{value:>{width}.0f}" if value is not None else f"{'-':>{width}}"

    for name, run in medians.items():
        p, c = run.cpu_percent, run.core_percent
        print(
            f"{name:<32}{cell(p['sut'])}{cell(p['sut_us_per_request'], 8)}"
            f"{cell(p.get('wrk'))}{cell(p.get('upstream'))}{cell(p.get('redis'))}"
            f"{cell(c.get('cpu0'))}{cell(c.get('cpu1'))}{cell(c['softirq'])}"
            f"{cell(c['other'])}{cell(c['steal'])}"
        )

    noisy = [name for name, run in medians.items() if run.core_percent["other"] > NOISE_LIMIT]
    if noisy:
        print(
            f"\n!!! other work on the machine took more than {NOISE_LIMIT}% of a core during: "
            f"{', '.join(noisy)}.\n!!! Those figures are disturbed: rerun on a quiet machine "
            "(or with --rounds 3)."
        )
    out["noisy"] = noisy

    def figure(name: str, what: str) -> float | None:
        run = medians.get(name)
        if run is None:
            return None
        if what == "cpu_us":
            return run.cpu_percent["sut_us_per_request"]
        return float(getattr(run.result, what))

    pairs = [
        ("gateway pass-through / upstream direct (req/s)", "gateway pass-through",
         "upstream direct", "rps", None),
        ("gateway pass-through / nginx (req/s)", "gateway pass-through",
         "nginx proxy_pass", "rps", None),
        # The admission budget, on the fair pair: the same GET, the same upstream
        # answer; the only difference is the admission decision in Redis.
        ("client GET (redis) / pass-through (req/s), target >= 0.90",
         "gateway client GET (redis)", "gateway pass-through", "rps", lambda v: v >= 0.9),
        ("client GET (redis) p99 / pass-through p99, target <= 1.20",
         "gateway client GET (redis)", "gateway pass-through", "p99_ms", lambda v: v <= 1.2),
        # The POST adds a request body to forward, which pass-through has not.
        ("client POST (redis) / pass-through (req/s)", "gateway client (redis)",
         "gateway pass-through", "rps", None),
        ("client POST (redis) p99 / pass-through p99", "gateway client (redis)",
         "gateway pass-through", "p99_ms", None),
        ("client POST (embedded) / client POST (redis) (req/s)", "gateway client (embedded)",
         "gateway client (redis)", "rps", None),
        ("client (redis) / pass-through, SUT CPU per request", "gateway client (redis)",
         "gateway pass-through", "cpu_us", None),
        ("client GET (redis) / pass-through, SUT CPU per request",
         "gateway client GET (redis)", "gateway pass-through", "cpu_us", None),
        ("model route (redis) / minimal proxy, streamed Responses (req/s)",
         "gateway model route (redis)", "minimal proxy, model stream", "rps", None),
        ("model route (redis) / minimal proxy, SUT CPU per request",
         "gateway model route (redis)", "minimal proxy, model stream", "cpu_us", None),
    ]  # fmt: skip
    print("\nRatios")
    out["ratios"] = {}
    for label, top, bottom, what, met in pairs:
        value = ratio(figure(top, what), figure(bottom, what))
        out["ratios"][label] = value
        verdict = ""
        if value is not None and met is not None:
            verdict = "  met" if met(value) else "  MISSED"
        if any(name in medians and medians[name].result.errors for name in (top, bottom)):
            verdict = "  INVALID: requests failed"
        shown = f"{value:.2f}x" if value is not None else "n/a"
        print(f"  {label:<62}{shown:>8}{verdict}")
    if rounds == 1:
        # Measured on the 2-core development VM: one round's req/s moved by up
        # to 15% between identical runs, with no other work on the machine.
        print("  (one round: repeat runs differ by up to ~15%; --rounds 3 before deciding)")

    if bench.model_parser_us is not None:
        out["model_usage_parser_us"] = bench.model_parser_us
        print(
            f"  usage parser: {bench.model_parser_us:.1f} us per streamed Responses answer "
            "(framing every event, parsing the one with usage)"
        )

    figures = bench.redis_figures
    if figures is not None:
        print("\nRedis during 'gateway client (redis)' (INFO commandstats delta, measured runs)")
        print(
            f"  redis commands per client request: {figures.per_request:.2f} "
            f"(target 1.00; {figures.client_commands} client commands / "
            f"{figures.requests} requests wrk counted)"
        )
        print(
            f"  EVALSHA per request: {figures.evalsha / max(figures.requests, 1):.3f}; "
            f"per gateway decision: {figures.evalsha / max(figures.decisions, 1):.3f} "
            f"({figures.decisions} decisions; wrk leaves out requests in flight at its end)"
        )
        print(f"  commands run inside admit.lua (counted by Redis too): {figures.script_commands}")
        if figures.other:
            print(f"  other client commands: {figures.other}")
        out["redis"] = {**asdict(figures), "commands_per_request": figures.per_request}

    out["targets_met"] = print_targets(bench, medians)
    if bench.memory:
        costs = import_costs(sys.executable)
        out["import_rss"] = dict(costs)
        print("\nWhere idle memory goes: RSS each group of imports adds to a fresh interpreter")
        for label, size in costs:
            print(f"  {size / 2**20:6.1f} MB  {label}")
    if bench.workers_layout:
        print(f"\nTarget 5: {bench.workers_layout}")

    for note in bench.notes:
        print(f"\nnote: {note}")
    out["notes"] = bench.notes
    return out, status


@dataclass
class Target:
    """One performance target: what was measured against what, and the verdict."""

    label: str
    measured: str
    value: float | None
    goal: str
    met: Callable[[float], bool] | None
    invalid: bool = False

    @property
    def verdict(self) -> str:
        if self.invalid:
            return "INVALID"
        if self.value is None:
            return "n/a"
        if self.met is None:
            return "info"
        return "PASS" if self.met(self.value) else "MISS"


def targets(bench: Bench, medians: dict[str, Run]) -> list[Target]:
    """Every target of the performance issue, each against its baseline in this run."""

    def r(name: str) -> WrkResult | None:
        run = medians.get(name)
        return run.result if run is not None else None

    def bad(*names: str) -> bool:
        return any((x := r(n)) is not None and x.errors > 0 for n in names)

    out: list[Target] = []

    def pair(
        label: str, top: str, bottom: str, what: str, goal: str, met: Callable[[float], bool] | None
    ) -> None:
        a, b = r(top), r(bottom)
        value = None
        measured = "not measured"
        if a is not None and b is not None:
            x, y = getattr(a, what), getattr(b, what)
            value = x / y if y else None
            unit = "req/s" if what == "rps" else "ms"
            measured = f"{x:,.2f} / {y:,.2f} {unit}" if unit == "ms" else f"{x:,.0f} / {y:,.0f}"
        out.append(Target(label, measured, value, goal, met, bad(top, bottom)))

    client, minimal = "gateway client (redis)", "minimal proxy"
    pair(
        "1 client route (redis) req/s vs minimal proxy",
        client,
        minimal,
        "rps",
        ">= 0.80x (stretch 0.90x)",
        lambda v: v >= 0.8,
    )
    pair(
        "1 client route (redis) p99 vs minimal proxy",
        client,
        minimal,
        "p99_ms",
        "<= 1.20x",
        lambda v: v <= 1.2,
    )

    gw1, min1, up1 = r("gateway client (redis) c1"), r("minimal proxy c1"), r("upstream direct c1")
    if gw1 is not None and up1 is not None:
        added = gw1.p50_ms - up1.p50_ms
        shown = f"{gw1.p50_ms:.3f} - {up1.p50_ms:.3f} direct"
        if min1 is not None:
            shown += f" (minimal proxy adds {min1.p50_ms - up1.p50_ms:.3f})"
        out.append(
            Target(
                "2 one connection: added p50 (ms)",
                shown,
                added,
                "<= 0.30 ms",
                lambda v: v <= 0.3,
                bad("gateway client (redis) c1", "upstream direct c1"),
            )
        )
    pair(
        "2 one connection: p99 vs minimal proxy",
        "gateway client (redis) c1",
        "minimal proxy c1",
        "p99_ms",
        "<= 1.50x",
        lambda v: v <= 1.5,
    )

    idle = bench.idle_streams
    if idle is not None:
        out.append(
            Target(
                f"3 {idle.opened:,} idle SSE streams: RSS growth per stream (KB)",
                f"{idle.rss_before / 2**20:.0f} -> {idle.rss_open / 2**20:.0f} MB, opened in "
                f"{idle.open_seconds:.1f}s",
                idle.kb_per_stream,
                "< 40 KB",
                lambda v: v < 40,
            )
        )
        out.append(
            Target(
                "3 open fds after they close, over before",
                f"{idle.fds_before} before, {idle.fds_open} open, {idle.fds_after} after",
                float(idle.fds_after - idle.fds_before),
                "<= +10 (flat)",
                lambda v: v <= 10,
            )
        )
    else:
        out.append(Target("3 idle SSE streams", "not measured", None, "< 40 KB/stream", None))
    paced = bench.paced
    if "direct" in paced and "gateway" in paced:
        g, d = paced["gateway"], paced["direct"]
        gp99, dp99 = float(g["p99_ms"] or 0), float(d["p99_ms"] or 0)  # type: ignore[arg-type]
        out.append(
            Target(
                f"3 {g['opened']:,} streams at 1 event/s: added per-event p99 (ms)",
                f"{gp99:.3f} - {dp99:.3f} direct ({g['events']:,} events, p50 {g['p50_ms']} ms)",
                gp99 - dp99,
                "<= 1.00 ms",
                lambda v: v <= 1.0,
            )
        )
    else:
        out.append(Target("3 paced SSE streams", "not measured", None, "<= 1 ms", None))

    pair(
        "4 401 answers req/s vs admitted",
        "gateway 401 unknown secret",
        client,
        "rps",
        ">= 2.00x",
        lambda v: v >= 2.0,
    )
    pair(
        "4 429 answers req/s vs admitted",
        "gateway 429 over limit",
        client,
        "rps",
        ">= 2.00x",
        lambda v: v >= 2.0,
    )
    pair(
        "4 admitted req/s under a 401 flood vs alone",
        "gateway client under 401 flood",
        client,
        "rps",
        "(info)",
        None,
    )
    if bench.flood:
        out[-1].measured += f"; flood answered {bench.flood['rejected_rps']:,.0f} 401/s"
        if bench.flood.get("rejected_errors"):
            out[-1].invalid = True

    pair(
        "5 2 workers vs 1 worker req/s (cores shared)",
        "gateway 2 workers, 2 cores",
        "gateway 1 worker, 2 cores",
        "rps",
        ">= 1.80x",
        lambda v: v >= 1.8,
    )

    mem = bench.memory
    for what in ("idle", "loaded"):
        gw, mp = mem.get("gateway", {}).get(what), mem.get("minimal proxy", {}).get(what)
        value = gw / mp if gw and mp else None
        shown = f"{gw / 2**20:.1f} / {mp / 2**20:.1f} MB" if gw and mp else "not measured"
        out.append(
            Target(f"6 RSS {what} vs minimal proxy", shown, value, "<= 1.30x", lambda v: v <= 1.3)
        )

    pair(
        "7 issued turn req/s vs learned session",
        "gateway issued turn",
        client,
        "rps",
        ">= 0.90x",
        lambda v: v >= 0.9,
    )
    pair(
        "7 issued read req/s vs learned session",
        "gateway issued read",
        client,
        "rps",
        ">= 0.90x",
        lambda v: v >= 0.9,
    )
    cost = envelope_cost_us()
    out.append(
        Target(
            "7 envelope read (parse + class), in process",
            f"{cost:.2f} µs per request (a threads.create envelope)",
            cost,
            "(info)",
            None,
        )
    )
    return out  # fmt: skip


def print_targets(bench: Bench, medians: dict[str, Run]) -> dict[str, Any]:
    found = targets(bench, medians)
    print("\nTargets (each against its baseline measured in this run)")
    width = max(len(t.label) for t in found) + 2
    for t in found:
        value = f"{t.value:.2f}" if t.value is not None else "-"
        print(f"  {t.label:<{width}}{value:>9}  {t.goal:<26}{t.verdict:<8}{t.measured}")
    return {
        t.label: {"value": t.value, "goal": t.goal, "verdict": t.verdict, "measured": t.measured}
        for t in found
    }


def markdown(bench: Bench, data: dict[str, Any]) -> str:
    """docs/performance.md's tables, from one run's figures."""
    lines = [
        "| target | req/s | p50 ms | p99 ms | SUT CPU µs/request |",
        "|---|---|---|---|---|",
    ]
    for outcome in bench.outcomes:
        run = outcome.median
        if not outcome.wrk_row or run is None:
            continue
        r = run.result
        lines.append(
            f"| {outcome.name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {run.cpu_percent['sut_us_per_request']:,.0f} |"
        )
    lines += ["", "| target | measured | goal | verdict | figures |", "|---|---|---|---|---|"]
    for label, t in data.get("targets_met", {}).items():
        value = f"{t['value']:.2f}" if t["value"] is not None else "-"
        lines.append(f"| {label} | {value} | {t['goal']} | {t['verdict']} | {t['measured']} |")
    costs = data.get("import_rss")
    if costs:
        lines += ["", "| idle RSS, by what is imported | MB |", "|---|---|"]
        lines += [f"| {label} | {size / 2**20:.1f} |" for label, size in costs.items()]
    return "\n".join(lines) + "\n"

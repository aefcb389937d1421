"""The tables ``scripts/bench`` prints, and the figures it writes as JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.targets import Bench, Run

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
    header = f"{'target':<28}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"
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
        if run is None:
            why = f"FAILED: {outcome.failed.splitlines()[0]}" if outcome.failed else "skipped:"
            print(f"{outcome.name:<28}  {why} {outcome.skipped or ''}")
            continue
        medians[outcome.name] = run
        r = run.result
        entry["median"] = asdict(run)
        print(
            f"{outcome.name:<28}{r.rps:>10,.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
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
                print(f"  {outcome.name:<28}{shown}")

    print(
        "\nCPU during each measured run, in % of one core: the process under test (SUT) and"
        "\nits CPU time per request, the load side (wrk, backend fake upstream, redis), how"
        "\nbusy each core was, softirq (loopback TCP, charged to no process), 'other' (busy"
        "\ntime none of these explain: other work on the machine) and hypervisor steal"
    )
    print(
        f"{'target':<28}{'SUT':>6}{'us/req':>8}{'wrk':>6}{'upstr':>6}{'redis':>6}"
        f"{'cpu0':>6}{'cpu1':>6}{'sirq':>6}{'other':>6}{'steal':>6}"
    )

    def cell(value: float | None, width: int = 6) -> str:
        return f"{value:>{width}.0f}" if value is not None else f"{'-':>{width}}"

    for name, run in medians.items():
        p, c = run.cpu_percent, run.core_percent
        print(
            f"{name:<28}{cell(p['sut'])}{cell(p['sut_us_per_request'], 8)}"
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

    for note in bench.notes:
        print(f"\nnote: {note}")
    out["notes"] = bench.notes
    return out, status

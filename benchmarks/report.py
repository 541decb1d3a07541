#!/usr/bin/env python3
"""Turn the raw benchmark lines (one JSON object per run) into the summary tables.

Usage: report.py RAW.jsonl --json OUT.json --md OUT.md [--readme README.md]
                 [--previous OLD.jsonl --previous-when DATE]

With --previous (a partial run, `ONLY=... benchmarks/run`), the configurations this run did
not measure are kept from OLD.jsonl, each record stamped with the date it was measured
(`when`), and RAW.jsonl is rewritten with the merged records; the tables say which rows
come from which date.

Every figure is the median over a configuration's runs (at least three). Ratios compare
medians measured in the same invocation of benchmarks/run, on the same machine.
With --readme, the table between the README's `<!-- results:begin -->` and
`<!-- results:end -->` markers is replaced by the new one.
"""
import argparse
import json
import statistics
import sys
from collections import OrderedDict

DENSITY = ("worker-density-fit", "worker-density-tight")
# Gateway overhead: the NATS client path and the HTTP gateway's, run in turn on one pipeline.
GATEWAY_BASE = "gateway-baseline-nats"
GATEWAY = (GATEWAY_BASE, "gateway-kserve-json", "gateway-kserve-binary")
EMBEDDING_MODEL = "minilm"
STAGES = ["ingress", "capacity_wait", "dispatch", "worker_queue", "inference", "outcome", "verification", "delivery"]


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def record_key(r):
    """What a record measured: one configuration, or one fleet size of the scale run."""
    if r.get("bench") == "scale":
        return ("scale", r["slices"])
    return key(r)


def merge(previous, new, when, previous_when):
    """`new` (stamped `when`) and the records of `previous` whose configurations it lacks."""
    for r in new:
        r.setdefault("when", when)
    for r in previous:
        r.setdefault("when", previous_when)
    measured = {record_key(r) for r in new}
    return [r for r in previous if record_key(r) not in measured] + new


def dates_line(rows, when):
    """Which rows come from which date, when they are not all from this run."""
    older = OrderedDict()
    for r in rows:
        d = r.get("when")
        if d and d != when:
            older.setdefault(d, set()).add(r["system"] if r.get("bench") != "scale" else "scale")
    if not older:
        return None
    fresh = OrderedDict()
    for r in rows:
        if r.get("when") == when:
            fresh.setdefault(r["system"], None)
    parts = [f"{d}: {', '.join(sorted(systems))}" for d, systems in older.items()]
    return (f"This run ({when}) measured {', '.join(fresh)}; the other rows are kept from earlier runs ("
            + "; ".join(parts) + ").")


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def per_s(r, field):
    """A counter of one run (over its measured window) per second; None where absent."""
    v, d = r.get(field), r.get("duration_s")
    return v / d if v is not None and d else None


def level(r):
    if r.get("mode") == "open":
        return f"R={r['rate']:.0f}/s"
    return f"C={r['concurrency']}"


def key(r):
    return (r["system"], r["model"], r.get("k"), r.get("mode", "closed"), level(r), r.get("rows", 1))


def summarise(rows):
    groups = OrderedDict()
    for r in rows:
        if r.get("bench") == "scale":
            continue
        groups.setdefault(key(r), []).append(r)
    out = []
    for (system, model, k, mode, lvl, nrows), runs in groups.items():
        entry = {
            "system": system,
            "model": model,
            "k": k,
            "mode": mode,
            "level": lvl,
            "concurrency": runs[0].get("concurrency"),
            "rows": nrows,
            "runs": len(runs),
            "tasks_per_s": med([r["tasks_per_s"] for r in runs]),
            "p50_ms": med([r["p50_ms"] for r in runs]),
            "p90_ms": med([r["p90_ms"] for r in runs]),
            "p95_ms": med([r.get("p95_ms") for r in runs]),
            "p99_ms": med([r["p99_ms"] for r in runs]),
            "errors": sum(r.get("errors", 0) for r in runs),
            "loadgen_cpu_cores": med([r.get("loadgen_cpu_cores") for r in runs]),
            "machine_cpu_cores": med([r.get("machine_cpu_cores") for r in runs]),
            "nats_msgs_per_task": med([r.get("nats_msgs_per_task") for r in runs]),
            "redis_cmds_per_task": med([r.get("redis_cmds_per_task") for r in runs]),
        }
        if runs[0].get("workload") == "embeddings":
            entry.update(
                {
                    "workload": "embeddings",
                    "texts_per_request": runs[0].get("texts_per_request"),
                    "tokens_per_request": med([r.get("tokens_per_request") for r in runs]),
                    "texts_per_s": med([r.get("texts_per_s") for r in runs]),
                    "tokens_per_s": med([r.get("tokens_per_s") for r in runs]),
                }
            )
        if system in DENSITY:
            entry.update(
                {
                    "models_served": med([r.get("models_served") for r in runs]),
                    "models_bytes": med([r.get("models_bytes") for r in runs]),
                    "memory_budget": med([r.get("memory_budget") for r in runs]),
                    "memory_used": med([r.get("memory_used") for r in runs]),
                    "resident_models": med([r.get("resident_models") for r in runs]),
                    "loads_per_s": med([per_s(r, "loads") for r in runs]),
                    "evictions_per_s": med([per_s(r, "evictions") for r in runs]),
                }
            )
        stages = [r.get("stages_p50_ms") or {} for r in runs]
        if any(stages):
            entry["stages_p50_ms"] = {s: med([st.get(s) for st in stages]) for s in STAGES}
        cpu = [r.get("cpu_cores") or {} for r in runs]
        if any(cpu):
            names = sorted({n for c in cpu for n in c})
            entry["cpu_cores"] = {n: med([c.get(n) for c in cpu]) for n in names}
        out.append(entry)
    return out


def scale_summary(rows):
    groups = OrderedDict()
    for r in rows:
        if r.get("bench") == "scale":
            groups.setdefault(r["slices"], []).append(r)
    out = []
    for slices, runs in sorted(groups.items()):
        out.append(
            {
                "slices": slices,
                "runs": len(runs),
                "reserve_k1_p50_ms": med([r["reserve_k1_p50_ms"] for r in runs]),
                "reserve_k1_p99_ms": med([r["reserve_k1_p99_ms"] for r in runs]),
                "reserve_k3_p50_ms": med([r["reserve_k3_p50_ms"] for r in runs]),
                "reserve_k3_p99_ms": med([r["reserve_k3_p99_ms"] for r in runs]),
                "dispatch_per_s": med([r["dispatch_per_s"] for r in runs]),
                "slices_used": med([r.get("dispatch_distinct_slices") for r in runs]),
                "reachable_slots": med([r.get("reachable_slots") for r in runs]),
                "fleet_slots": med([r.get("fleet_slots") for r in runs]),
                "probe_cap": med([r.get("reachable_probe_cap") for r in runs]),
            }
        )
    return out


def find(summary, system, model, k=None, level=None, mode="closed"):
    for e in summary:
        if e["system"] == system and e["model"] == model and e["mode"] == mode:
            if (k is None or e["k"] == k) and (level is None or e["level"] == level):
                return e
    return None


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def mib(v):
    return None if v is None else v / (1 << 20)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def density_figures(summary):
    """The density scenarios side by side; None unless both ran (a partial run)."""
    fit, tight = find(summary, "worker-density-fit", "mixed4"), find(summary, "worker-density-tight", "mixed4")
    if not (fit and tight and fit.get("tasks_per_s") and tight.get("tasks_per_s") is not None):
        return None
    served = tight.get("models_served") or fit.get("models_served")
    return {
        "fit": fit,
        "tight": tight,
        "served": f"{served:.0f}" if served is not None else "several",
        "budget_mib": mib(tight.get("memory_budget")),
        "models_mib": mib(tight.get("models_bytes")),
        "kept": tight["tasks_per_s"] / fit["tasks_per_s"],
        "evictions_per_s": tight.get("evictions_per_s"),
    }


def density_line(summary):
    """The operator's answer in one sentence; None unless both density scenarios ran."""
    d = density_figures(summary)
    if not d:
        return None
    return (
        f"One worker serves {d['served']} models; within a tight memory budget ({fmt(d['budget_mib'], 0)} MiB for "
        f"{fmt(d['models_mib'], 0)} MiB of models) it keeps {100 * d['kept']:.0f}% of the throughput it has with all "
        f"resident, at {fmt(d['evictions_per_s'], 1)} evictions/s."
    )


def targets(summary, scale):
    """The issue's targets, each with the measured value and whether it is met."""
    checks = []

    def add(name, value, goal, ok):
        # ok None: a figure reported without a target (not counted as met or missed).
        checks.append({"target": name, "measured": value, "goal": goal, "met": ok})

    best_k1 = max((e["tasks_per_s"] for e in summary if e["system"] == "sundara" and e["model"] == "mlp" and e["k"] == 1), default=None)
    best_k2 = max((e["tasks_per_s"] for e in summary if e["system"] == "sundara" and e["model"] == "mlp" and e["k"] == 2), default=None)
    if best_k1 is not None:
        add("k=1 verified tasks/s (mlp, best level)", f"{best_k1:,.0f}", ">= 5,000", best_k1 >= 5000)
    if best_k2 is not None:
        add("k=2 verified tasks/s (mlp, best level)", f"{best_k2:,.0f}", ">= 3,000", best_k2 >= 3000)
    c16 = find(summary, "sundara", "mlp", 1, "C=16")
    if c16:
        add("p50 at C=16, k=1 (ms)", fmt(c16["p50_ms"]), "<= 2 ms", c16["p50_ms"] <= 2.0)
    for peer in ("ray-serve", "ray-serve-batch", "celery"):
        for lvl in ("C=1", "C=16", "C=64"):
            s, p = find(summary, "sundara", "mlp", 1, lvl), find(summary, peer, "mlp", None, lvl)
            if s and p:
                x = ratio(s["tasks_per_s"], p["tasks_per_s"])
                add(
                    f"throughput vs {peer} at {lvl} (p99 {fmt(s['p99_ms'])} vs {fmt(p['p99_ms'])} ms)",
                    f"{x:.1f}x",
                    ">= 10x and lower p99",
                    x >= 10 and s["p99_ms"] < p["p99_ms"],
                )
    b1, b32 = find(summary, "worker-batch-1", "mlp"), find(summary, "worker-batch-32", "mlp")
    if b1 and b32 and b1.get("p95_ms") and b32.get("p95_ms"):
        x = ratio(b32["tasks_per_s"], b1["tasks_per_s"])
        p95 = b32["p95_ms"] / b1["p95_ms"]
        add(
            f"worker batching gain, mlp, {b1['level']} (p95 {fmt(b32['p95_ms'])} vs {fmt(b1['p95_ms'])} ms)",
            f"{x:.1f}x at {p95:.2f}x p95",
            ">= 3x at <= 1.1x p95",
            x >= 3 and p95 <= 1.1,
        )
    d = density_figures(summary)
    if d:
        add(
            f"models per worker: throughput in a tight budget ({fmt(d['budget_mib'], 0)} MiB for {fmt(d['models_mib'], 0)} MiB "
            f"of {d['served']} models) / all resident ({fmt(d['tight']['tasks_per_s'])} vs {fmt(d['fit']['tasks_per_s'])} tasks/s, "
            f"p95 {fmt(d['tight'].get('p95_ms'))} vs {fmt(d['fit'].get('p95_ms'))} ms)",
            f"{100 * d['kept']:.0f}% at {fmt(d['evictions_per_s'], 1)} evictions/s",
            ">= 50%",
            d["kept"] >= 0.5,
        )
    heavy = find(summary, "sundara", "mlp_heavy", 1)
    ceiling = find(summary, "ort-in-process", "mlp_heavy")
    if heavy and ceiling:
        x = ratio(heavy["tasks_per_s"], ceiling["tasks_per_s"])
        add("mlp_heavy throughput / ort in-process (same 2 threads)", f"{100 * x:.0f}%", ">= 90%", x >= 0.9)
    for path in GATEWAY[1:]:
        g1, n1 = find(summary, path, "mlp", 1, "C=1"), find(summary, GATEWAY_BASE, "mlp", 1, "C=1")
        if g1 and n1:
            added = g1["p50_ms"] - n1["p50_ms"]
            add(f"{path}: p50 added at C=1, k=1 ({fmt(g1['p50_ms'])} vs {fmt(n1['p50_ms'])} ms over NATS)",
                f"{added:+.2f} ms", "<= 0.3 ms", added <= 0.3)
        g64, n64 = find(summary, path, "mlp", 1, "C=64"), find(summary, GATEWAY_BASE, "mlp", 1, "C=64")
        if g64 and n64:
            x = ratio(g64["tasks_per_s"], n64["tasks_per_s"])
            add(f"{path}: throughput at C=64, k=1 / NATS path ({fmt(g64['tasks_per_s'])} vs {fmt(n64['tasks_per_s'])} tasks/s)",
                f"{100 * x:.0f}%", ">= 90%", x >= 0.9)
    emb = embedding_rows(summary)
    ceiling = find(summary, "ort-in-process", EMBEDDING_MODEL)
    k1 = next((e for e in emb if e["system"] == "sundara-http" and e["k"] == 1), None)
    if k1 and ceiling and ceiling.get("texts_per_s"):
        x = k1["texts_per_s"] / ceiling["texts_per_s"]
        add(f"embeddings k=1 vs in-process ({fmt(k1['texts_per_s'])} vs {fmt(ceiling['texts_per_s'])} texts/s)",
            f"{100 * x:.0f}%", ">= 80%", x >= 0.8)
    peer = next((e for e in emb if e["system"] == "ray-serve"), None)
    if k1 and peer and peer.get("texts_per_s"):
        x = k1["texts_per_s"] / peer["texts_per_s"]
        add(f"embeddings k=1 vs ray-serve ({fmt(k1['texts_per_s'])} vs {fmt(peer['texts_per_s'])} texts/s, "
            f"p99 {fmt(k1['p99_ms'])} vs {fmt(peer['p99_ms'])} ms)", f"{x:.2f}x", "reported (no target)", None)
    by_n = {s["slices"]: s for s in scale}
    if 10000 in by_n:
        p99 = by_n[10000]["reserve_k1_p99_ms"]
        add("scheduler decision p99 at 10,000 slices (ms)", fmt(p99, 3), "< 1 ms", p99 < 1.0)
        if 10 in by_n and by_n[10]["reserve_k1_p99_ms"]:
            x = p99 / by_n[10]["reserve_k1_p99_ms"]
            add("decision p99 at 10,000 / at 10 slices", f"{x:.2f}x", "<= 2x", x <= 2.0)
    return checks


def embedding_rows(summary):
    return [e for e in summary if e.get("workload") == "embeddings"]


def main_rows(summary):
    """The throughput table's rows: every tensor workload but the gateway comparison."""
    return [e for e in summary if e["system"] not in GATEWAY and e.get("workload") != "embeddings"]


def gateway_lines(summary):
    rows = [e for e in summary if e["system"] in GATEWAY]
    if not rows:
        return []
    lines = [
        "",
        "**Gateway overhead** (mlp, k=1, one pipeline: the NATS client path, KServe v2 JSON and KServe binary "
        "through `sundara gateway`, run after run in turn; ratios against the NATS path at the same load)",
        "",
        "| path | load | tasks/s | p50 ms | p99 ms | errors | gateway cores | tasks/s vs NATS | p50 added ms | p99 vs NATS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        base = find(summary, GATEWAY_BASE, e["model"], e["k"], e["level"])
        gw = (e.get("cpu_cores") or {}).get("gateway")
        if e["system"] == GATEWAY_BASE or not base:
            vs = ("–", "–", "–")
        else:
            tput = ratio(e["tasks_per_s"], base["tasks_per_s"])
            p99 = ratio(e["p99_ms"], base["p99_ms"])
            vs = (f"{100 * tput:.0f}%", f"{e['p50_ms'] - base['p50_ms']:+.2f}", f"{p99:.2f}x")
        path = "NATS client (`PipelineClient`)" if e["system"] == GATEWAY_BASE else e["system"]
        lines.append(
            f"| {path} | {e['level']} | {fmt(e['tasks_per_s'])} | {fmt(e['p50_ms'])} | {fmt(e['p99_ms'])} | {e['errors']} "
            f"| {fmt(gw)} | {vs[0]} | {vs[1]} | {vs[2]} |"
        )
    return lines


def embedding_lines(summary):
    rows = embedding_rows(summary)
    if not rows:
        return []
    ceiling = find(summary, "ort-in-process", EMBEDDING_MODEL)
    per = rows[0].get("texts_per_request")
    tokens = rows[0].get("tokens_per_request")
    lines = [
        "",
        f"**Text embeddings** (all-MiniLM-L6-v2, OpenAI `POST /v1/embeddings` with {fmt(per)} texts per request, "
        f"{fmt(tokens, 1)} tokens per request on average; `ort-in-process` tokenizes and runs the same graph on the "
        "same 2 threads, the ceiling)",
        "",
        "| system | k | load | texts/s | tokens/s | requests/s | p50 ms | p99 ms | errors | of in-process | machine cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        of = ratio(e.get("texts_per_s"), ceiling.get("texts_per_s") if ceiling else None)
        lines.append(
            f"| {e['system']} | {fmt(e['k'])} | {e['level']} | {fmt(e.get('texts_per_s'))} | {fmt(e.get('tokens_per_s'))} "
            f"| {fmt(e['tasks_per_s'])} | {fmt(e['p50_ms'])} | {fmt(e['p99_ms'])} | {e['errors']} "
            f"| {'–' if of is None else f'{100 * of:.0f}%'} | {fmt(e['machine_cpu_cores'])} |"
        )
    return lines


def reach(s):
    """Slots a probe could reserve, of the fleet's; the probe stops at its cap."""
    got, cap, total = s.get("reachable_slots"), s.get("probe_cap"), s.get("fleet_slots")
    if got is not None and cap and got >= cap and total and total > cap:
        return f"all {fmt(cap)} probed (probe cap) of {fmt(total)}"
    return f"{fmt(got)} of {fmt(total)}"


def markdown(summary, scale, checks, meta):
    lines = []
    lines.append(f"Measured {meta['when']} on {meta['machine']}; medians of {meta['runs']} runs per row.")
    if meta.get("dates"):
        lines.append(meta["dates"])
    lines.append("")
    lines.append("**Targets**")
    lines.append("")
    lines.append("| target | measured | goal | met |")
    lines.append("|---|---|---|---|")
    for c in checks:
        met = "–" if c["met"] is None else "yes" if c["met"] else "**no**"
        lines.append(f"| {c['target']} | {c['measured']} | {c['goal']} | {met} |")
    lines.append("")
    lines.append("**Throughput and latency** (one row per task; closed loop C = requests in flight, open loop R = offered rate)")
    lines.append("")
    lines.append("| system | model | k | load | tasks/s | p50 ms | p90 ms | p99 ms | errors | load generator cores | machine cores |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for e in main_rows(summary):
        lines.append(
            f"| {e['system']} | {e['model']} | {fmt(e['k'])} | {e['level']} | {fmt(e['tasks_per_s'])} | {fmt(e['p50_ms'])} "
            f"| {fmt(e['p90_ms'])} | {fmt(e['p99_ms'])} | {e['errors']} | {fmt(e['loadgen_cpu_cores'])} | {fmt(e['machine_cpu_cores'])} |"
        )
    lines.extend(gateway_lines(summary))
    lines.extend(embedding_lines(summary))
    density = [e for e in summary if e["system"] in DENSITY]
    if density:
        lines.append("")
        line = density_line(summary)
        if line:
            lines.append(line)
            lines.append("")
        lines.append(
            "**Models per worker** (one executor, 2 threads, serving the four demo models in bursts of 8 tasks; "
            "loads and evictions per second of the measured window, resident models at its end)"
        )
        lines.append("")
        lines.append(
            "| system | load | memory budget MiB | models MiB | resident models | tasks/s | p50 ms | p95 ms | p99 ms "
            "| loads/s | evictions/s | errors |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for e in density:
            served = e.get("models_served")
            resident = fmt(e.get("resident_models"), 0) + (f" of {served:.0f}" if served is not None else "")
            lines.append(
                f"| {e['system']} | {e['level']} | {fmt(mib(e.get('memory_budget')), 0)} | {fmt(mib(e.get('models_bytes')), 0)} "
                f"| {resident} | {fmt(e['tasks_per_s'])} | {fmt(e['p50_ms'])} | {fmt(e.get('p95_ms'))} | {fmt(e['p99_ms'])} "
                f"| {fmt(e.get('loads_per_s'), 1)} | {fmt(e.get('evictions_per_s'), 1)} | {e['errors']} |"
            )
    staged = [e for e in summary if e.get("stages_p50_ms") and e["system"] == "sundara"]
    if staged:
        lines.append("")
        lines.append("**Where a Sundara task's time goes** (median of each stage, ms)")
        lines.append("")
        lines.append("| model | k | load | " + " | ".join(STAGES) + " |")
        lines.append("|---|---|---|" + "---|" * len(STAGES))
        for e in staged:
            st = e["stages_p50_ms"]
            lines.append(f"| {e['model']} | {e['k']} | {e['level']} | " + " | ".join(fmt(st[s]) for s in STAGES) + " |")
        lines.append("")
        lines.append(
            "**CPU by process during Sundara runs** (cores; the machine has 2), and server-side work per verified task"
        )
        lines.append("")
        names = sorted({n for e in staged for n in (e.get("cpu_cores") or {})})
        lines.append("| model | k | load | " + " | ".join(names) + " | NATS msgs/task | Redis cmds/task |")
        lines.append("|---|---|---|" + "---|" * (len(names) + 2))
        for e in staged:
            c = e.get("cpu_cores") or {}
            lines.append(
                f"| {e['model']} | {e['k']} | {e['level']} | " + " | ".join(fmt(c.get(n)) for n in names)
                + f" | {fmt(e.get('nats_msgs_per_task'), 1)} | {fmt(e.get('redis_cmds_per_task'), 1)} |"
            )
    if scale:
        lines.append("")
        lines.append("**Scheduler at fleet scale** (real Redis capacity entries, simulated workers that answer at once)")
        lines.append("")
        lines.append("| slices | decision k=1 p50 ms | k=1 p99 ms | k=3 p50 ms | k=3 p99 ms | dispatch/s | slices used | slots reachable |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for s in scale:
            lines.append(
                f"| {s['slices']:,} | {fmt(s['reserve_k1_p50_ms'], 3)} | {fmt(s['reserve_k1_p99_ms'], 3)} | {fmt(s['reserve_k3_p50_ms'], 3)} "
                f"| {fmt(s['reserve_k3_p99_ms'], 3)} | {fmt(s['dispatch_per_s'])} | {fmt(s['slices_used'])} | {reach(s)} |"
            )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--readme")
    ap.add_argument("--when", default="")
    ap.add_argument("--machine", default="this machine")
    ap.add_argument("--previous", help="records of an earlier run, kept for what this run did not measure")
    ap.add_argument("--previous-when", default="earlier", help="the date of --previous' unstamped records")
    args = ap.parse_args()
    rows = load(args.raw)
    if args.previous:
        rows = merge(load(args.previous), rows, args.when, args.previous_when)
        with open(args.raw, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    summary = summarise(rows)
    scale = scale_summary(rows)
    checks = targets(summary, scale)
    runs = min((e["runs"] for e in summary), default=0)
    meta = {"when": args.when, "machine": args.machine, "runs": runs, "dates": dates_line(rows, args.when)}
    with open(args.json, "w") as f:
        json.dump(
            {"meta": meta, "summary": summary, "scale": scale, "targets": checks, "density": density_line(summary)}, f, indent=1
        )
    md = markdown(summary, scale, checks, meta)
    with open(args.md, "w") as f:
        f.write(md)
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        begin, end = "<!-- results:begin -->", "<!-- results:end -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            with open(args.readme, "w") as f:
                f.write(head + begin + "\n" + md + end + tail)
        else:
            print(f"report: {args.readme} has no results markers; left as is", file=sys.stderr)
    print(md)
    judged = [c for c in checks if c["met"] is not None]
    missed = [c for c in judged if not c["met"]]
    print(f"targets met: {len(judged) - len(missed)} of {len(judged)}")


if __name__ == "__main__":
    main()

"""A study's results, rebuilt from its run folders alone: results.jsonl (one row per run), results.md (one table
per factor: mean ± sd over seeds, the delta to the base and whether it exceeds 2 sd of the base's seed spread),
deltas.png (one bar chart of deltas per factor) and curves.png (validation curves per factor, overlaid).

The plan (which run is which factor, value and seed) is DIR/study.json, written by `python -m train.ablate`;
everything measured is read from DIR/<run>/metrics.jsonl, config.json and failed.json.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from train.logger import read_metrics

SIGNIFICANCE_SDS = 2.0  # a delta is named better / worse only beyond this many sd of the base's seed spread


def tokens_per_step(config: dict) -> int:
    t = config["train"]
    return t["batch_size"] * t["grad_accum"] * config["model"]["block_size"]


def run_row(out: Path, run: dict) -> dict:
    """One run's row: status (done | failed | unfinished | pending) and, when done, what it measured."""
    folder = out / run["name"]
    row = {"run": run["name"], "factor": run["factor"], "value": run["value"], "seed": run["seed"],
           "train_seed": int(run["overrides"]["train.seed"]), "status": "pending"}
    if (folder / "failed.json").exists():
        failure = json.loads((folder / "failed.json").read_text())
        return row | {"status": "failed", "error": failure["error"], "exit_code": failure["exit_code"]}
    if not (folder / "metrics.jsonl").exists():
        return row
    lines = read_metrics(folder / "metrics.jsonl")
    config = lines[0]["config"]
    steps = [r for r in lines if "event" not in r]
    end = next((r for r in reversed(lines) if r.get("event") == "end"), None)
    if end is None:
        return row | {"status": "unfinished", "steps": steps[-1]["step"] if steps else 0}  # running or stopped
    row |= {"status": "done", "params": end["n_params"], "steps": end["step"],
            "tokens": end["step"] * tokens_per_step(config), "tokens_per_s": end.get("tokens_per_s"),
            "train_time_s": end["train_time_s"], "git_sha": lines[0].get("git_sha"),
            "dataset": lines[0].get("dataset", {}).get("name")}
    for key in ("full_val_bpc", "full_val_protocol", "full_test_bpc", "full_test_protocol"):
        row[key] = end.get(key)
    return row


def curve(out: Path, run_name: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """One run's (tokens, running val bpc) points and its (tokens, whole-split val bpc) at the end (a different
    protocol, so drawn apart)."""
    path = out / run_name / "metrics.jsonl"
    if not path.exists():
        return [], []
    lines = read_metrics(path)
    per_step = tokens_per_step(lines[0]["config"])
    running = [(r["step"] * per_step, r["val_bpc"]) for r in lines if "event" not in r and "val_bpc" in r]
    final = [(r["step"] * per_step, r["full_val_bpc"]) for r in lines
             if r.get("event") == "end" and "full_val_bpc" in r]
    return running, final


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def verdict(delta: float | None, base_sd: float | None) -> str:
    """The significance rule: beyond SIGNIFICANCE_SDS sd of the base's seed spread it is better or worse (lower
    bpc is better); within it, noise; with one base seed there is no spread to judge by."""
    if delta is None:
        return "-"
    if base_sd is None:
        return "n/a (base: 1 seed)"
    if abs(delta) > SIGNIFICANCE_SDS * base_sd:
        return "better" if delta < 0 else "worse"
    return "noise"


def summarise(rows_by_run: dict[str, dict], names: list[str]) -> dict:
    done = [rows_by_run[n] for n in names if rows_by_run[n]["status"] == "done"]
    val_mean, val_sd = mean_sd([r["full_val_bpc"] for r in done])
    test_mean, test_sd = mean_sd([r["full_test_bpc"] for r in done])
    speeds = [r["tokens_per_s"] for r in done if r.get("tokens_per_s")]
    return {"n": len(done), "of": len(names), "val": val_mean, "val_sd": val_sd, "test": test_mean, "test_sd": test_sd,
            "params": done[0]["params"] if done else None, "steps": mean_sd([r["steps"] for r in done])[0],
            "tokens_per_s": statistics.fmean(speeds) if speeds else None,
            "failed": [rows_by_run[n] for n in names if rows_by_run[n]["status"] == "failed"]}


def factor_tables(plan: dict, rows_by_run: dict[str, dict]) -> dict[str, list[dict]]:
    """Per factor, one entry per value: its summary, delta to the base and verdict."""
    out = {}
    for factor, levels in plan["tables"].items():
        entries = [{"value": lv["value"], "base": lv["base"], **summarise(rows_by_run, lv["runs"])} for lv in levels]
        base = entries[0]
        for e in entries:
            e["delta"] = None if e["base"] or e["val"] is None or base["val"] is None else e["val"] - base["val"]
            e["verdict"] = "base" if e["base"] else verdict(e["delta"], base["val_sd"])
        out[factor] = entries
    return out


def fmt(value: float | None, sd: float | None = None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def markdown(plan: dict, rows: list[dict], tables: dict[str, list[dict]]) -> str:
    study = plan["study"]
    count = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "unfinished", "pending")}
    done = [r for r in rows if r["status"] == "done"]
    protocol = next((r["full_val_protocol"] for r in done), "-")
    base = tables[next(iter(tables))][0] if tables else {}
    lines = [f"# Study: {study['name']}", "",
             f"- base: preset `{study['preset']}`" + "".join(f", `{k}={v}`" for k, v in study["base"].items()),
             f"- budget per run: {study['budget'] or 'the base config own'}; seeds: {study['seeds']}; "
             f"runs: {len(rows)} ({', '.join(f'{v} {k}' for k, v in count.items() if v)})",
             f"- machine: {plan.get('machine', '-')}; code: {', '.join(sorted({r['git_sha'] or '-' for r in done}))}"
             f"; data: {', '.join(sorted({r['dataset'] or '-' for r in done}))}",
             f"- bpc: whole validation and test splits at the end of each run ({protocol})",
             f"- Δ = mean validation bpc − the base's ({fmt(base.get('val'), base.get('val_sd'))}); "
             f"**better** / **worse** when |Δ| > {SIGNIFICANCE_SDS:g} sd of the base's seeds, else noise", ""]
    ranked = sorted((e["delta"], f, e) for f, es in tables.items() for e in es if e["delta"] is not None)
    if ranked:
        lines += ["## Every value against the base, best first", "", "| factor | value | Δ val bpc | verdict |",
                  "|---|---|---|---|"]
        lines += [f"| `{f}` | {e['value']} | {e['delta']:+.4f} | {e['verdict']} |" for _, f, e in ranked]
        lines.append("")
    for factor, entries in tables.items():
        lines += [f"## `{factor}`", "", "| value | runs | val bpc | test bpc | Δ val | verdict | params | steps | "
                  "tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
        for e in entries:
            delta = "-" if e["delta"] is None else f"{e['delta']:+.4f}"
            params = "-" if e["params"] is None else f"{e['params'] / 1e6:.2f}M"
            steps = "-" if e["steps"] is None else f"{e['steps']:,.0f}"
            speed = "-" if e["tokens_per_s"] is None else f"{e['tokens_per_s']:,.0f}"
            lines.append(f"| {e['value']}{' (base)' if e['base'] else ''} | {e['n']}/{e['of']} | "
                         f"{fmt(e['val'], e['val_sd'])} | {fmt(e['test'], e['test_sd'])} | {delta} | {e['verdict']} | "
                         f"{params} | {steps} | {speed} |")
        lines.append("")
    if plan.get("grid"):
        lines += grid_table(plan, rows, tables)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["## Failed runs", "", "| run | exit code | error |", "|---|---|---|"]
        lines += [f"| {r['run']} | {r['exit_code']} | {r['error'].replace('|', chr(92) + '|')} |" for r in failed]
        lines.append("")
    return "\n".join(lines)


def grid_cell_runs(plan: dict, a_row: dict, b_row: dict) -> list[str]:
    a, b = plan["grid"]
    if a_row["base"]:
        return b_row["runs"]
    if b_row["base"]:
        return a_row["runs"]
    cell = (f"{a} x {b}", f"{a_row['value']} x {b_row['value']}")
    return [r["name"] for r in plan["runs"] if (r["factor"], r["value"]) == cell]


def grid_table(plan: dict, rows: list[dict], tables: dict) -> list[str]:
    """Mean validation bpc of every combination of the grid's two factors (rows: the first, columns: the second)."""
    a, b = plan["grid"]
    by_run = {r["run"]: r for r in rows}
    a_rows, b_rows = plan["tables"][a], plan["tables"][b]
    lines = [f"## Grid: `{a}` (rows) x `{b}` (columns), mean validation bpc", "",
             "| | " + " | ".join(r["value"] for r in b_rows) + " |", "|---" * (len(b_rows) + 1) + "|"]
    for ar in a_rows:
        cells = [fmt(summarise(by_run, grid_cell_runs(plan, ar, br))["val"]) for br in b_rows]
        lines.append(f"| {ar['value']} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(out: Path, plan: dict, tables: dict[str, list[dict]]) -> None:
    """deltas.png and curves.png: one panel per factor each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = list(tables)
    fig, axes = panels(plt, len(factors))
    for ax, factor in zip(axes, factors):
        entries = [e for e in tables[factor] if not e["base"]]
        base = tables[factor][0]
        xs = range(len(entries))
        deltas = [e["delta"] if e["delta"] is not None else math.nan for e in entries]
        colors = [{"better": "C2", "worse": "C3"}.get(e["verdict"], "0.6") for e in entries]
        ax.bar(xs, deltas, yerr=[e["val_sd"] or 0.0 for e in entries], color=colors, capsize=3)
        for x, e in zip(xs, entries):
            if e["delta"] is None:
                ax.text(x, 0, "failed" if e["failed"] else "pending", ha="center", va="bottom", fontsize=7)
        if base["val_sd"] is not None:
            band = SIGNIFICANCE_SDS * base["val_sd"]
            ax.axhspan(-band, band, color="0.85", zorder=0, label=f"±{SIGNIFICANCE_SDS:g} sd of base")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [e["value"] for e in entries], rotation=20, fontsize=7)
        ax.set_title(f"{factor} (base {base['value']})", fontsize=9)
        ax.set_ylabel("Δ val bpc vs base", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    save(plt, fig, out / "deltas.png",
         f"{plan['study']['name']}: validation bpc minus the base's (lower is better; grey: noise band)")

    fig, axes = panels(plt, len(factors))
    for ax, factor in zip(axes, factors):
        for i, e in enumerate(tables[factor]):
            color = "k" if e["base"] else f"C{i % 10}"
            for j, name in enumerate(next(lv for lv in plan["tables"][factor] if lv["value"] == e["value"])["runs"]):
                running, final = curve(out, name)
                ax.plot([p[0] / 1e6 for p in running], [p[1] for p in running], color=color, lw=1.0, alpha=0.8,
                        label=e["value"] + (" (base)" if e["base"] else "") if j == 0 else None)
                ax.plot([p[0] / 1e6 for p in final], [p[1] for p in final], "o", color=color, mfc="none", ms=4)
        ax.set_title(factor, fontsize=9)
        ax.set_xlabel("tokens (M)", fontsize=8)
        ax.set_ylabel("val bpc", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save(plt, fig, out / "curves.png", f"{plan['study']['name']}: running validation bpc during training, every "
                                       f"seed (circles: whole split at the end)")


def panels(plt, n: int):
    """A figure with one panel per factor (4 a row); the unused panels of the last row blanked."""
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def save(plt, fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_report(out: Path, plots: bool = True) -> list[dict]:
    """Write results.jsonl, results.md and (with matplotlib) the two PNGs into the study folder; returns the rows."""
    plan = json.loads((out / "study.json").read_text())
    rows = [run_row(out, run) for run in plan["runs"]]
    tables = factor_tables(plan, {r["run"]: r for r in rows})
    tmp = out / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "results.jsonl")
    (out / "results.md").write_text(markdown(plan, rows, tables) + "\n")
    if plots and any(r["status"] == "done" for r in rows):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return rows
        plot(out, plan, tables)
    return rows

"""Ratios against the reference and their comparison with a stored baseline: the logic behind
`python -m bench --check`, kept free of timing so that it is unit-tested on synthetic results."""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

BASELINES = Path(__file__).parent / "baselines"


def device_class(device_name: str) -> str:
    """The baseline file's stem for a device: its name in lower case with dashes ('cpu-amd-epyc',
    'nvidia-h100-80gb-hbm3')."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


EXTRA_KEYS = ("tokens_per_s", "mfu", "bytes_per_s", "gbps", "of_copy", "peak_extra_mib", "run_seconds", "params",
              "cache_bytes_per_token")  # a result's optional numbers, in the order the tables show them


def extra_fields(result: dict, sep: str = "=", timing_prefix: str = "") -> str:
    """A result's optional numbers as 'key=value, ...' (and how it was timed, when by CUDA graph or stream)."""
    extra = ", ".join(f"{k}{sep}{result[k]:.3g}" for k in EXTRA_KEYS if k in result)
    if result.get("timing") in ("graph", "stream"):
        extra = ", ".join(filter(None, [extra, timing_prefix + result["timing"]]))
    return extra


def ratios(results: list[dict]) -> dict[str, float]:
    """name -> speed-up over its reference measured in the same run (reference seconds / seconds; > 1 is
    faster). Results without a reference in the run, and the references themselves, have no ratio."""
    by_name = {r["name"]: r for r in results}
    out = {}
    for r in results:
        ref = by_name.get(r.get("reference", ""))
        if ref is not None and ref is not r:
            out[r["name"]] = ref["seconds"] / r["seconds"]
    return out


def median_ratios(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per case over repeated runs: the median ratio and the spread (max / min - 1)."""
    names = set().union(*runs)
    med = {n: statistics.median(r[n] for r in runs if n in r) for n in names}
    spread = {n: max(r[n] for r in runs if n in r) / min(r[n] for r in runs if n in r) - 1 for n in names}
    return med, spread


@dataclass
class Verdict:
    name: str
    baseline: float | None
    current: float | None
    status: str  # ok | regressed | improved | new | missing

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current / self.baseline - 1


def compare(current: dict[str, float], baseline: dict[str, float], tolerance: float) -> list[Verdict]:
    """A ratio more than `tolerance` (relative) below its baseline has regressed; a baseline case that did not
    run is missing; both fail the check."""
    verdicts = []
    for name in sorted(set(current) | set(baseline)):
        cur, base = current.get(name), baseline.get(name)
        if cur is None:
            status = "missing"
        elif base is None:
            status = "new"
        elif cur < base * (1 - tolerance):
            status = "regressed"
        elif cur > base * (1 + tolerance):
            status = "improved"
        else:
            status = "ok"
        verdicts.append(Verdict(name, base, cur, status))
    return verdicts


def failed(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.status in ("regressed", "missing")]


def baseline_path(device: str) -> Path | None:
    """The device's own baseline; a CPU without one falls back to cpu.json (measured on an Intel Xeon)."""
    for stem in [device_class(device)] + (["cpu"] if device.startswith("cpu") else []):
        if (BASELINES / f"{stem}.json").exists():
            return BASELINES / f"{stem}.json"
    return None


def load_baseline(device: str) -> dict | None:
    path = baseline_path(device)
    return {**json.loads(path.read_text()), "file": path.name} if path else None


def save_baseline(device: str, ratios_: dict[str, float], tolerance: float, extra: dict) -> Path:
    BASELINES.mkdir(exist_ok=True)
    path = BASELINES / f"{device_class(device)}.json"
    path.write_text(json.dumps({"device": device, "tolerance": tolerance, "ratios": dict(sorted(ratios_.items())),
                                **extra}, indent=2) + "\n")
    return path


def verdict_table(verdicts: list[Verdict], tolerance: float) -> str:
    rows = [f"{'case':<48} {'baseline':>9} {'now':>9} {'change':>8}  status (tolerance {tolerance:.0%})"]
    for v in verdicts:
        fmt = lambda x: f"{x:9.3f}" if x is not None else f"{'-':>9}"
        change = f"{v.change:+8.1%}" if v.change is not None else f"{'-':>8}"
        rows.append(f"{v.name:<48} {fmt(v.baseline)} {fmt(v.current)} {change}  {v.status}")
    return "\n".join(rows)

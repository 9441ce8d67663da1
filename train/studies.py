"""What an ablation study is: a base config, factors (a knob and the values to try), seeds and a budget; and the
plan of runs that tests one factor at a time against the base (plus, optionally, the full grid of two factors).

A study comes from the command line, from a TOML file, or from the built-in `notes` study:

    name = "norm-and-lr"                  # optional; shown in results.md
    seeds = 2                             # every run repeated with train.seed = base seed + 0, 1, ...
    budget = "tokens=2000000"             # steps=N | seconds=S | tokens=T; omitted: the base config's own budget
    grid = ["model.norm", "train.lr"]     # optional: also every combination of these two factors
    [base]
    preset = "cpu"
    "train.warmup_steps" = 50             # any dotted override (or nested tables: [base.train] warmup_steps = 50)
    [factors]
    "model.norm" = ["layernorm", "rmsnorm"]
    "train.optimizer" = ["adamw", {value = "ivon", "train.lr" = 0.3}]   # a value with companion overrides

A factor's value that equals the base config's is the base run itself (run once, shown in every factor's table).
"""
from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train.config import PRESETS, ConfigError, cpu_has_bf16, set_value, to_dict

BUDGET_KEYS = {"steps": "train.max_steps", "seconds": "train.max_time", "tokens": "train.max_tokens"}


@dataclass
class Level:
    label: str  # the value as shown in tables and run names: "rmsnorm", "ivon+train.lr=0.3"
    overrides: dict[str, str]  # dotted key -> value as given on the command line


@dataclass
class Factor:
    key: str  # the dotted knob varied
    levels: list[Level]


@dataclass
class Study:
    preset: str = "cpu"  # the base config's preset
    base: dict[str, str] = field(default_factory=dict)  # the base config's overrides on its preset
    factors: list[Factor] = field(default_factory=list)
    seeds: int = 1  # repeats of every run, seeds base+0, base+1, ...
    budget: str = ""  # steps=N | seconds=S | tokens=T; "" = the base config's own
    grid: tuple[str, str] | None = None  # two factor keys whose every combination is run too
    name: str = "study"


@dataclass
class PlannedRun:
    name: str  # the run folder's name inside the study folder
    factor: str  # "base", a factor key, or "A x B" for a grid cell
    value: str  # the level's label ("base" for the base run)
    seed: int  # seed index, 0..seeds-1
    overrides: dict[str, str]  # everything on top of the preset: base, budget, level, seed


# ------------------------------------------------------------------------------------------------ parsing
def cli_value(value) -> str:
    """A TOML / Python value as the command line spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(cli_value(v) for v in value)
    return str(value)


def flatten(table: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}, "model.norm": "rmsnorm"} -> {"train.lr": "0.001", "model.norm": "rmsnorm"}."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = cli_value(value)
    return out


def level(key: str, value) -> Level:
    """One value of a factor: a plain value, or {value = X, other.key = Y, ...} (companion overrides)."""
    if isinstance(value, dict):
        extra = flatten(value)
        if "value" not in extra:
            raise ConfigError(f"a value of factor {key} is a table without 'value': {value}")
        main = extra.pop("value")
        label = "+".join([main] + [f"{k}={v}" for k, v in extra.items()])
        return Level(label, {key: main, **extra})
    return Level(cli_value(value), {key: cli_value(value)})


def parse_vary(arg: str) -> Factor:
    """`model.norm=layernorm,rmsnorm` from --vary."""
    key, eq, values = arg.partition("=")
    if not eq or not values.strip():
        raise ConfigError(f"--vary {arg!r}: expected KEY=VALUE1,VALUE2,...")
    return Factor(key, [level(key, v) for v in values.split(",") if v != ""])


def parse_budget(budget: str) -> dict[str, str]:
    """'tokens=2e6' -> the three budget knobs, the chosen one set and the others off."""
    if not budget:
        return {}
    kind, _, amount = budget.partition("=")
    if kind not in BUDGET_KEYS or not amount:
        raise ConfigError(f"--budget {budget!r}: expected steps=N, seconds=S or tokens=T")
    out = {key: "0" for key in BUDGET_KEYS.values()}
    out[BUDGET_KEYS[kind]] = amount
    return out


def from_toml(path: Path) -> Study:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"study file {path}: {e}") from None
    return from_table(data, default_name=path.stem)


def from_table(data: dict, default_name: str) -> Study:
    unknown = set(data) - {"name", "seeds", "budget", "grid", "base", "factors"}
    if unknown:
        raise ConfigError(f"study {default_name}: unknown entries {sorted(unknown)} (name, seeds, budget, grid, "
                          f"base, factors)")
    base = flatten(data.get("base", {}))
    factors = [Factor(k, [level(k, v) for v in (vs if isinstance(vs, list) else [vs])])
               for k, vs in flatten_factors(data.get("factors", {})).items()]
    grid = data.get("grid")
    return Study(preset=base.pop("preset", "cpu"), base=base, factors=factors, seeds=int(data.get("seeds", 1)),
                 budget=str(data.get("budget", "")), grid=tuple(grid) if grid else None,
                 name=str(data.get("name", default_name)))


def flatten_factors(table: dict, prefix: str = "") -> dict[str, list]:
    """Factor tables may nest like the base ([factors.model] norm = [...]); the values are lists."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and "value" not in value:
            out.update(flatten_factors(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def notes(budget: str) -> dict:
    """The research notes' list: every knob they name, a value or two either side of the `cpu` preset. The
    'steps' item varies the budget itself (half and double). Precision only where bf16 runs (CUDA, CPUs with
    native bf16)."""
    factors = {
        "model.block_size": [32, 128], "model.n_head": [1, 4], "model.d_model": [96, 192], "model.dropout": [0.1],
        "model.n_layer": [2, 6], "model.norm": ["rmsnorm"], "model.bias": [False],
        "model.activation": ["relu", "swiglu", "solu"], "model.residual_scale": ["depth-scaled"],
        "model.pos_emb": ["learned", "learned_per_layer"], "model.init": ["gpt2", "small"],
        "train.lr": [2e-3, 8e-3],
        "train.optimizer": ["adamw", "adam", "sgd", {"value": "ivon", "train.lr": 0.2}],
        "model.ngram_max": [1, 6], "model.ngram_buckets": [4096],
        "train.grad_accum": [{"value": 2, "train.batch_size": 16}], "train.batch_size": [16, 64],
        "model.n_targets": [2], "model.intermediate_loss": [True],
    }
    if budget:
        kind, _, amount = budget.partition("=")
        scale = float if kind == "seconds" else (lambda v: int(float(v)))
        factors[BUDGET_KEYS[kind]] = [scale(float(amount) / 2), scale(float(amount) * 2)]
    if torch.cuda.is_available() or cpu_has_bf16():
        factors["train.precision"] = ["bf16"]
    return {"name": "notes", "seeds": 2, "budget": budget, "base": {"preset": "cpu"}, "factors": factors}


NOTES_BUDGET = "tokens=1000000"  # the notes study's default: about a minute of the cpu preset on a 2-core CPU


# ------------------------------------------------------------------------------------------------ planning
def config_for(study: Study, overrides: dict[str, str]):
    """The typed config of a run; unknown keys and ill-typed values raise ConfigError (impossible combinations
    do not: that run is launched and fails with its own error, recorded, while the study goes on)."""
    if study.preset not in PRESETS:
        raise ConfigError(f"unknown preset '{study.preset}'; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[study.preset]()
    for key, value in overrides.items():
        set_value(cfg, key, value)
    return cfg


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:120]


def plan(study: Study) -> tuple[list[PlannedRun], dict[str, list[dict]]]:
    """The runs (seed-major: every run of seed 0 first) and, per factor, its table's rows:
    {factor: [{"value": label, "base": bool, "runs": [run names, one per seed]}]}."""
    if study.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1 (got {study.seeds})")
    if not study.factors:
        raise ConfigError("a study needs at least one factor (--vary KEY=V1,V2 or a [factors] table)")
    keys = [f.key for f in study.factors]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"a factor is given twice: {sorted(k for k in keys if keys.count(k) > 1)[0]}")
    if study.grid and (len(study.grid) != 2 or not set(study.grid) <= set(keys)):
        raise ConfigError(f"grid {list(study.grid)}: name two of the factors ({', '.join(keys)})")
    common = {**study.base, **parse_budget(study.budget)}
    base_cfg = config_for(study, common)
    base_dict = to_dict(base_cfg)
    base_seed = base_cfg.train.seed

    def is_base(overrides: dict[str, str]) -> bool:
        return to_dict(config_for(study, {**common, **overrides})) == base_dict

    cells: list[tuple[str, str, dict[str, str]]] = [("base", "base", {})]  # (factor, label, level overrides)
    tables: dict[str, list[dict]] = {}
    for factor in study.factors:
        same = [is_base(lv.overrides) for lv in factor.levels]  # checks every key and value first
        section, _, name = factor.key.partition(".")
        base_value = cli_value(base_dict[section][name] if name else base_dict[section])
        rows = [{"value": base_value, "base": True, "cell": ("base", "base")}]
        for lv, base in zip(factor.levels, same):
            if base:
                continue
            if not any(r["value"] == lv.label for r in rows):
                cells.append((factor.key, lv.label, lv.overrides))
                rows.append({"value": lv.label, "base": False, "cell": (factor.key, lv.label)})
        tables[factor.key] = rows
    if study.grid:
        a, b = (next(f for f in study.factors if f.key == k) for k in study.grid)
        shown = {(f, row["value"]) for f, rows in tables.items() for row in rows if not row["base"]}
        for la in (lv for lv in a.levels if (a.key, lv.label) in shown):  # combinations of non-base values
            for lb in (lv for lv in b.levels if (b.key, lv.label) in shown):
                if not is_base({**la.overrides, **lb.overrides}):
                    cells.append((f"{a.key} x {b.key}", f"{la.label} x {lb.label}", {**la.overrides, **lb.overrides}))
    runs = []
    for seed in range(study.seeds):
        for factor, label, overrides in cells:
            name = "base" if factor == "base" else safe_name(
                ",".join(f"{k.split('.', 1)[-1]}={v}" for k, v in overrides.items()))
            runs.append(PlannedRun(f"{name}-s{seed}", factor, label, seed,
                                   {**common, **overrides, "train.seed": str(base_seed + seed)}))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        shared = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two runs of the study would share the folder {shared}")
    by_cell = {}
    for r in runs:
        by_cell.setdefault((r.factor, r.value), []).append(r.name)
    for rows in tables.values():
        for row in rows:
            row["runs"] = by_cell[row.pop("cell")]
    return runs, tables


def study_dict(study: Study) -> dict:
    return copy.deepcopy(dataclasses.asdict(study))

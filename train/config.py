"""The run config: one typed dataclass per section, presets as plain functions, dotted CLI overrides.

    python -m train --preset=cpu --model.n_layer=4 --train.lr=1e-3 --data.source=sample --out_dir=runs/a

Every field carries one trailing comment, which `--help` and the README's knob table show. Unknown keys, ill-typed
values and impossible combinations raise `ConfigError` with a one-line message before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

from model.config import ModelConfig, default_target_weights


class ConfigError(ValueError):
    """A bad config, CLI argument or input file: reported as one line, nothing allocated or written."""


@dataclass
class TrainConfig:
    optimizer: Literal["adamw", "adam", "sgd", "ivon", "muon"] = "adamw"  # adam: L2 decay; muon: Muon + AdamW
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine decay over the run, or constant
    warmup_steps: int = 100  # linear warmup from 0 over this many optimiser steps
    weight_decay: float = 0.1  # on matrices and embeddings only (not biases or norms)
    beta1: float = 0.9  # Adam/IVON first-moment decay
    beta2: float = 0.99  # Adam second-moment decay
    momentum: float = 0.99  # sgd momentum (Al-Rfou et al.: 0.99)
    muon_lr: float = 0.02  # muon: peak lr of the blocks' weight matrices (the rest: AdamW at train.lr)
    muon_momentum: float = 0.95  # muon: Nesterov momentum of the orthogonalised updates
    ivon_ess: float = 0.0  # ivon effective sample size; 0 = bytes in the training split
    ivon_hess_init: float = 1e-2  # ivon initial Hessian estimate (ivon wants a large lr, e.g. 0.2-0.5)
    batch_size: int = 16  # sequences per micro-step, global (split evenly across ranks)
    grad_accum: int = 1  # micro-steps per optimiser step
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    max_steps: int = 10000  # optimiser steps; 0 = no step limit (then max_time or max_tokens must be set)
    max_time: float = 0.0  # training budget in seconds (evaluation and checkpoint time not counted); 0 = no time limit
    max_tokens: int = 0  # training budget in tokens (batch_size x grad_accum x block_size a step); 0 = no token limit
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast to bfloat16 (CUDA, or a CPU with native bf16)
    compile: bool = False  # torch.compile the model
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"  # torch.compile mode
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    seed: int = 1337  # seeds parameters, data sampling and dropout
    log_interval: int = 10  # steps between metrics lines
    eval_interval: int = 250  # steps between running validations on eval_batches random batches; 0 = never
    eval_batches: int = 20  # batches (of batch_size windows) per running validation
    full_eval_interval: int = 10000  # steps between whole-split validations (also at the end); 0 = end only
    eval_stride: int = 0  # whole-split evaluation: bytes scored per window; 0 = block_size/4 (~stride 1's bpc)
    eval_batch_size: int = 0  # windows per forward pass in evaluation; 0 = 4 x batch_size
    final_eval: bool = True  # whole validation and test splits at the end of the run (false: skip both)
    ckpt_interval: int = 1000  # steps between checkpoints (and at the end, and on SIGTERM / Ctrl-C)
    skip_nonfinite: bool = False  # skip and count steps with a non-finite loss or gradient norm instead of stopping
    fsdp: bool = False  # shard parameters, gradients and optimiser state with FSDP2 (torchrun, 2+ ranks)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    profile: int = 0  # trace this many steps (after 5 warm-up) with torch.profiler: <out_dir>/trace.json, profile.txt


@dataclass
class DataConfig:
    source: str = "enwik8"  # enwik8 | sample (Wikipedia XML shipped with gensim) | path to any file
    data_dir: str = "data"  # where enwik8 and the unpacked sample are kept
    download_timeout: float = 20.0  # seconds before an enwik8 download gives up (then: fallback)
    fallback: bool = True  # enwik8 unavailable: train on sample with a loud warning (true) or stop with an error
    order: Literal["auto", "windows", "streams"] = "auto"  # training batches: random or contiguous (auto: iff mem_len)


@dataclass
class LogConfig:
    wandb: bool = False  # also log to Weights & Biases (the wandb extra; WANDB_MODE=offline works)
    wandb_project: str = "charlm"  # W&B project
    wandb_name: str = ""  # W&B run name; empty = the run folder's name
    plot: bool = True  # write <out_dir>/curves.png at the end of a run (and when it is interrupted); needs matplotlib


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    out_dir: str = ""  # run directory; empty = runs/<preset>-<date>-<time>

    def errors(self) -> list[str]:
        t = self.train
        out = list(self.model.errors())
        for name in ("lr", "muon_lr", "batch_size", "grad_accum", "log_interval", "eval_batches"):
            if getattr(t, name) <= 0:
                out.append(f"train.{name} must be > 0 (got {getattr(t, name)})")
        for name in ("max_steps", "max_time", "max_tokens", "warmup_steps", "weight_decay", "grad_clip",
                     "eval_interval", "full_eval_interval", "ckpt_interval", "ivon_ess", "eval_stride",
                     "eval_batch_size", "profile"):
            if getattr(t, name) < 0:
                out.append(f"train.{name} must be >= 0 (got {getattr(t, name)})")
        if t.eval_stride > self.model.block_size:
            out.append(f"train.eval_stride={t.eval_stride} must be at most model.block_size={self.model.block_size}")
        if t.max_steps == 0 and t.max_time == 0 and t.max_tokens == 0:
            out.append("set train.max_steps, train.max_time or train.max_tokens (all are 0: the run would never stop)")
        if not 0 <= t.min_lr_ratio <= 1:
            out.append(f"train.min_lr_ratio must be in [0, 1] (got {t.min_lr_ratio})")
        if t.precision == "bf16" and not uses_cuda(t) and not cpu_has_bf16():
            out.append("train.precision=bf16 needs a CUDA device or a CPU with native bf16 (AVX512-BF16 or AMX); "
                       "this CPU has neither: train in fp32")
        if t.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            out.append("train.fsdp=true needs torchrun with 2 or more ranks")
        if self.data.order == "windows" and self.model.mem_len:
            out.append(f"model.mem_len={self.model.mem_len} carries each row's memory into its next segment: it needs "
                       "contiguous streams (data.order=streams or auto), not random windows")
        if self.model.mem_len and t.activation_checkpointing:
            out.append("train.activation_checkpointing does not work with model.mem_len (the memory moves on in the "
                       "forward pass, which a recomputation would repeat)")
        if self.model.pos_emb == "xl_relative" and t.fsdp:
            out.append("model.pos_emb=xl_relative shares its u and v across layers, which train.fsdp cannot shard")
        if t.optimizer == "muon" and t.fsdp:
            out.append("train.optimizer=muon needs whole weight matrices: it does not work with train.fsdp")
        if t.optimizer == "ivon" and (t.fsdp or t.skip_nonfinite):
            out.append("train.optimizer=ivon works with neither train.fsdp nor train.skip_nonfinite")
        if t.device == "cuda" and not torch.cuda.is_available():
            out.append("train.device=cuda but no CUDA device is available")
        if self.log.wandb and not importable("wandb"):
            out.append("log.wandb=true needs the wandb package: pip install -e '.[wandb]'")
        return out


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # sys.modules[module] is None: its import is blocked
        return False


def uses_cuda(t: TrainConfig) -> bool:
    return t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())


def reads_streams(cfg: Config) -> bool:
    """Whether training reads contiguous streams (each batch row its own stretch, a memory carried along) rather
    than random windows."""
    return cfg.data.order == "streams" or (cfg.data.order == "auto" and cfg.model.mem_len > 0)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (oneDNN: AVX512-BF16 or AMX); elsewhere they are emulated."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ------------------------------------------------------------------------------------------------ presets
def tiny() -> Config:
    """Seconds on a CPU: for tests and smoke runs."""
    return Config(
        model=ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, block_size=32),
        train=TrainConfig(lr=3e-3, warmup_steps=5, batch_size=4, max_steps=30, log_interval=1, eval_interval=10,
                          eval_batches=2, ckpt_interval=10),
        data=DataConfig(source="sample"), log=LogConfig(plot=False))


def cpu() -> Config:
    """The best validation bpc measured in a 5-minute budget on 2 CPU cores (see README, 'How the cpu preset was
    chosen'): the shape of the first sweep, with the 64-byte context of the second round (twice the steps), and
    the third round's hashed 2-, 3- and 4-gram input tables of 16,384 rows each and Muon for the blocks' matrices."""
    return Config(
        model=ModelConfig(n_layer=4, n_head=2, d_model=128, d_ff=512, block_size=64, pos_emb="rope", ngram_max=4,
                          ngram_buckets=16384),
        train=TrainConfig(optimizer="muon", lr=4e-3, warmup_steps=50, batch_size=32, max_steps=0, max_time=300.0,
                          log_interval=10, eval_interval=200, eval_batches=8, full_eval_interval=0, ckpt_interval=500))


def t12() -> Config:
    """Al-Rfou et al. 2018, T12 (12 layers, d_model 512, context 512, ~44M parameters with its auxiliary heads).
    Values the paper gives: layers, widths, context, per-layer learned positions, auxiliary losses (intermediate
    layers, t+2 target at weight 0.5), momentum 0.99 at a fixed lr 0.003, batch 16. Values it leaves open for
    T12 and chosen here: n_head 8, ReLU MLP, pre-norm LayerNorm, dropout 0.55 (its T64 value), max_steps.
    As we read its multiple-targets section, every layer with a loss also predicts t+2 (intermediate_targets=2:
    24 heads in the first half of training, 2 after; 44.3M parameters, the paper's 44M). No fallback to the
    6 MB sample: without enwik8 the run stops.
    On CUDA: bf16 autocast, torch.compile and flash attention (sdpa when flash-attn is not installed)."""
    cuda = torch.cuda.is_available()
    return Config(
        model=ModelConfig(n_layer=12, n_head=8, d_model=512, d_ff=2048, block_size=512, dropout=0.55,
                          activation="relu", pos_emb="learned_per_layer", n_targets=2, target_weights=(1.0, 0.5),
                          intermediate_loss=True, intermediate_targets=2, attention="flash" if cuda else "sdpa"),
        train=TrainConfig(optimizer="sgd", lr=0.003, momentum=0.99, schedule="constant", warmup_steps=0,
                          weight_decay=0.0, grad_clip=0.0, batch_size=16, max_steps=400_000, log_interval=100,
                          eval_interval=1000, eval_batches=50, full_eval_interval=10_000, ckpt_interval=5000,
                          precision="bf16" if cuda else "fp32", compile=cuda),
        data=DataConfig(fallback=False))


def t12_modern() -> Config:
    """T12's size, training recipe and auxiliary heads with today's block: RMSNorm, SwiGLU (d_ff 1344, the multiple
    of 64 nearest to the 1365 that gives the ReLU MLP's parameters), rotary positions (no per-layer position
    tables), and every charlm kernel (model.kernels=triton: fused RMSNorm, SwiGLU and loss) under bf16 and
    torch.compile on CUDA: the fast modern baseline. 40.7M parameters."""
    cfg = t12()
    m = cfg.model
    m.norm, m.activation, m.d_ff, m.pos_emb, m.kernels = "rmsnorm", "swiglu", 1344, "rope", "triton"
    return cfg


def t12_xl() -> Config:
    """t12-modern with a Transformer-XL memory of 512 positions per layer (Dai et al.'s enwik8 setup trains with
    512 and evaluates with a longer one: python -m train.evaluate --mode memory --mem_len 2048). Training reads
    contiguous streams; the model has t12-modern's parameters (the memory has none)."""
    cfg = t12_modern()
    cfg.model.mem_len = 512
    return cfg


PRESETS = {"tiny": tiny, "cpu": cpu, "t12": t12, "t12-modern": t12_modern, "t12-xl": t12_xl}


def default_preset() -> str:
    return "t12" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ typed values
SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "log": LogConfig}


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Turn a CLI string (or a JSON value) into `typ`, or raise ConfigError naming the key."""
    def bad(why: str):
        return ConfigError(f"{key}={value!r}: {why}")

    if get_origin(typ) is Literal:
        choices = get_args(typ)
        if value not in choices:
            raise bad("expected one of " + " | ".join(choices))
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise bad("expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise bad("expected an integer")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad("expected an integer") from None
        if not f.is_integer():
            raise bad("expected an integer")
        return int(f)
    if typ is float:
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad("expected a number") from None
        if f != f or f in (float("inf"), float("-inf")):
            raise bad("expected a finite number")
        return f
    if get_origin(typ) is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        item_type = get_args(typ)[0]
        return tuple(_coerce(key, item_type, str(v).strip() if isinstance(v, str) else v)
                     for v in items if str(v).strip() != "")
    if typ is str:
        if not isinstance(value, str):
            raise bad("expected a string")
        return value
    raise bad(f"unsupported type {typ}")


def _field_types(cls) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys() -> list[str]:
    keys = [f"{s}.{k}" for s, cls in SECTIONS.items() for k in _field_types(cls)]
    return keys + ["out_dir"]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else "; see python -m train --help"
    return ConfigError(f"unknown config key '{key}'{hint}")


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key, typed by its dataclass annotation."""
    if key == "out_dir":
        cfg.out_dir = _coerce(key, str, value)
        return
    section, _, name = key.partition(".")
    if section not in SECTIONS or name not in _field_types(SECTIONS[section]):
        raise _unknown(key)
    setattr(getattr(cfg, section), name, _coerce(key, _field_types(SECTIONS[section])[name], value))


def to_dict(cfg: Config) -> dict:
    """Plain JSON-able data, one object per section."""
    d = dataclasses.asdict(cfg)
    for section in d.values():
        if isinstance(section, dict):
            section.update({k: list(v) for k, v in section.items() if isinstance(v, tuple)})  # JSON's arrays
    return d


def from_dict(d: dict) -> Config:
    """Inverse of to_dict; unknown keys are rejected."""
    cfg = Config()
    for key, value in d.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{key}' must be an object")
            for name, v in value.items():
                set_value(cfg, f"{key}.{name}", v)
        else:
            set_value(cfg, key, value)
    return cfg


# ------------------------------------------------------------------------------------------------ CLI
@dataclass
class Args:
    cfg: Config
    preset: str
    resume: bool = False
    overwrite: bool = False
    overrides: dict[str, str] = field(default_factory=dict)


FLAGS = ("resume", "overwrite")


def parse_args(argv: list[str]) -> Args:
    """`[--preset=NAME] [--resume] [--overwrite] [--section.field=value ...]`. Raises ConfigError."""
    pairs, flags, i = [], set(), 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}'; options look like --section.field=value")
        key, eq, value = arg[2:].partition("=")
        if key in FLAGS and not eq:
            flags.add(key)
        elif eq:
            pairs.append((key, value))
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((key, argv[i + 1]))
            i += 1
        else:
            raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
        i += 1
    presets = [v for k, v in pairs if k == "preset"]
    preset = presets[-1] if presets else default_preset()
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    overrides = {}
    for key, value in pairs:
        if key != "preset":
            set_value(cfg, key, value)
            overrides[key] = value
    m = cfg.model
    if "model.target_weights" not in overrides and len(m.target_weights) != m.n_targets:
        m.target_weights = default_target_weights(m.n_targets)  # --model.n_targets=3 alone: the paper's weights
    # a resumed run's config is its checkpoint's plus the overrides, checked once loaded (train.loop.prepare_out_dir),
    # not the default preset's (whose own settings may clash with an override, e.g. the cpu preset's Muon with FSDP)
    problems = [] if "resume" in flags else cfg.errors()
    if problems:
        raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""))
    return Args(cfg, preset, "resume" in flags, "overwrite" in flags, overrides)


def _values(typ) -> str:
    if get_origin(typ) is Literal:
        return " \\| ".join(get_args(typ))
    if get_origin(typ) is tuple:
        return "floats, comma-separated"
    return typ.__name__


def knob_table() -> list[tuple[str, str, str, str]]:
    """(key, values, default, comment) for every field; comments are read from the dataclasses' source."""
    rows = []
    for section, cls in list(SECTIONS.items()) + [("", Config)]:
        comments = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
        defaults = dataclasses.asdict(cls()) if section else {"out_dir": ""}
        types = _field_types(cls)
        for name in types if section else ["out_dir"]:
            key = f"{section}.{name}" if section else name
            rows.append((key, _values(types[name]), repr(defaults[name]), comments.get(name, "")))
    return rows


def help_text() -> str:
    lines = ["usage: python -m train [--preset=NAME] [--resume] [--overwrite] [--section.field=value ...]",
             f"presets: {', '.join(PRESETS)} (default: {default_preset()} on this machine)", "", "knobs:"]
    width = max(len(k) for k, *_ in knob_table())
    lines += [f"  --{k:<{width}}  {v.replace(chr(92), '')}: {c} [default {d}]" for k, v, d, c in knob_table()]
    return "\n".join(lines)


def knob_markdown() -> str:
    """The README's knob table: `python -m train.config`."""
    return "\n".join(f"| `{k}` | {v} | `{d}` | {c.replace('|', chr(92) + '|')} |" for k, v, d, c in knob_table())


if __name__ == "__main__":
    print(knob_markdown())

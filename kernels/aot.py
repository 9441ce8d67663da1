"""Ahead-of-time compilation of every Triton kernel of the package for A100 (sm_80) and H100 (sm_90a), no GPU
needed, with each kernel's resource usage as `cuobjdump -res-usage` (shipped in the triton wheel) reports it.

    python -m kernels.aot [--arch 80 90] [--json]

One row per kernel x variant x arch: REG (registers per thread), STACK (bytes of stack frame per thread), SHARED
(static shared memory, bytes), LOCAL (bytes of local memory per thread), and the dynamic shared memory Triton
requests. A STACK or LOCAL other than 0 is a register spill: the exit code is then 1. The variants are the dtypes and
widths the model launches, with the tile sizes and warps the launchers would pick on a GPU with the installed
triton (some launch configurations depend on its version). Must run without TRITON_INTERPRET (the interpreter
replaces the compiler). `.ci/triton_versions` (CI) runs it on every triton version the project accepts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.layernorm import _layernorm_bwd_kernel, _layernorm_fwd_kernel
from kernels.layernorm import launch_config as layernorm_config
from kernels.mhce import _ce_rows_kernel, _mhce_kernel, gemm_launch_config
from kernels.mhce import launch_config as mhce_config
from kernels.rmsnorm import _rmsnorm_bwd_kernel, _rmsnorm_fwd_kernel
from kernels.rmsnorm import launch_config as rmsnorm_config
from kernels.swiglu import _swiglu_bwd_kernel, _swiglu_fwd_kernel
from kernels.swiglu import launch_config as swiglu_config

ARCHS = (80, 90)
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclass
class Variant:
    name: str
    fn: object  # a triton JITFunction
    signature: dict  # argument name -> triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict
    options: dict  # num_warps, and num_stages where the launcher sets it


def _launch(fn, name: str, pointers: dict, scalars: dict, cfg: dict) -> Variant:
    """A variant as the launcher would run it: `cfg` is the launcher's launch_config (constexprs + options)."""
    constexprs = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    options = {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}
    signature = {**pointers, **scalars, **{k: "constexpr" for k in constexprs}}
    missing = set(fn.arg_names) - set(signature)
    if missing:
        raise ValueError(f"{fn.__name__}: no type for {sorted(missing)}")
    return Variant(name, fn, {k: signature[k] for k in fn.arg_names}, constexprs, options)


def variants() -> list[Variant]:
    """Every kernel at the dtypes and widths the model uses (d_model 512 in T12; 2048 and 4096 for wider
    models; 8192 exercises the chunked path of rows wider than one block)."""
    out = []
    for dt in ("bf16", "fp32"):
        for n in (512, 2048, 4096, 8192):
            cfg = rmsnorm_config(n, interpret=False)
            out.append(_launch(_rmsnorm_fwd_kernel, f"rmsnorm_fwd {dt} d={n}",
                               {"X": f"*{dt}", "W": "*fp32", "Y": f"*{dt}", "RSTD": "*fp32"},
                               {"n_rows": "i32", "n_cols": "i32", "stride_x": "i32", "stride_y": "i32", "eps": "fp32"},
                               cfg))
            out.append(_launch(_rmsnorm_bwd_kernel, f"rmsnorm_bwd {dt} d={n}",
                               {"DY": f"*{dt}", "X": f"*{dt}", "W": "*fp32", "RSTD": "*fp32", "DX": f"*{dt}",
                                "DW_PART": "*fp32"},
                               {"n_rows": "i32", "n_cols": "i32", "stride_dy": "i32", "stride_x": "i32",
                                "stride_dx": "i32"}, cfg))
        for n in (512, 2048, 4096):
            for bias in (True, False):
                cfg = {**layernorm_config(n, interpret=False), "HAS_BIAS": bias}
                tag = f"{dt} d={n}{'' if bias else ' no-bias'}"
                out.append(_launch(_layernorm_fwd_kernel, f"layernorm_fwd {tag}",
                                   {"X": f"*{dt}", "W": "*fp32", "B": "*fp32", "Y": f"*{dt}", "MEAN": "*fp32",
                                    "RSTD": "*fp32"},
                                   {"n_rows": "i32", "n_cols": "i32", "stride_x": "i32", "stride_y": "i32",
                                    "eps": "fp32"}, cfg))
                out.append(_launch(_layernorm_bwd_kernel, f"layernorm_bwd {tag}",
                                   {"DY": f"*{dt}", "X": f"*{dt}", "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                                    "DX": f"*{dt}", "DW_PART": "*fp32", "DB_PART": "*fp32"},
                                   {"n_rows": "i32", "n_cols": "i32", "stride_dy": "i32", "stride_x": "i32",
                                    "stride_dx": "i32"}, cfg))
        for need_grad in (True, False):
            cfg = {**gemm_launch_config(256, interpret=False), "HAS_BIAS": True, "NEED_GRAD": need_grad}
            out.append(_launch(_ce_rows_kernel, f"mhce_gemm_rows_{'fwd_bwd' if need_grad else 'fwd'} {dt} V=256",
                               {"LOGITS": f"*{dt}", "B": f"*{dt}", "T": "*i64", "COEF": "*fp32", "NLL": "*fp32"},
                               {k: "i32" for k in ("n_pos", "V", "heads_per_source", "stride_ls", "stride_ln",
                                                   "stride_bh", "stride_th", "stride_nll")}, cfg))
        cfg = swiglu_config(2048, interpret=False)
        out.append(_launch(_swiglu_fwd_kernel, f"swiglu_fwd {dt}",
                           {"G": f"*{dt}", "U": f"*{dt}", "Y": f"*{dt}"},
                           {"n_rows": "i32", "n_cols": "i32", "stride_g": "i32", "stride_u": "i32", "stride_y": "i32"},
                           cfg))
        out.append(_launch(_swiglu_bwd_kernel, f"swiglu_bwd {dt}",
                           {"DY": f"*{dt}", "G": f"*{dt}", "U": f"*{dt}", "DG": f"*{dt}", "DU": f"*{dt}"},
                           {"n_rows": "i32", "n_cols": "i32", "stride_dy": "i32", "stride_g": "i32", "stride_u": "i32",
                            "stride_dg": "i32", "stride_du": "i32"}, cfg))
        for need_grad in (True, False):
            cfg = {**mhce_config(256, TORCH_DTYPES[dt], interpret=False), "HAS_BIAS": True, "NEED_GRAD": need_grad,
                   "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32"}
            out.append(_launch(_mhce_kernel, f"mhce_{'fwd_bwd' if need_grad else 'fwd'} {dt} V=256",
                               {"X": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "T": "*i64", "HW": "*fp32",
                                "COUNT": "*i32", "HEAD_ORDER": "*i32", "SRC_START": "*i32", "LOSS_PART": "*fp32",
                                "DX": f"*{dt}", "DW": "*fp32", "DB": "*fp32"},
                               {k: "i32" for k in ("N", "D", "V", "n_heads", "n_slots", "stride_xs", "stride_xn",
                                                   "stride_wh", "stride_wv", "stride_bh", "stride_th")}, cfg))
    return out


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups())))


def compile_variant(v: Variant, arch: int) -> dict:
    kernel = triton.compile(ASTSource(v.fn, v.signature, v.constexprs), target=GPUTarget("cuda", arch, 32),
                            options=v.options)
    return {"kernel": v.name, "arch": f"sm_{arch}" + ("a" if arch == 90 else ""), "triton": triton.__version__,
            "num_warps": v.options["num_warps"], **resource_usage(kernel.asm["cubin"]),
            "dyn_smem": int(kernel.metadata.shared)}


def spills(row: dict) -> bool:
    return row["stack"] > 0 or row["local"] > 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    header = (f"{'kernel':<24} {'arch':<7} {'warps':>5} {'REG':>4} {'STACK':>5} {'SHARED':>6} {'LOCAL':>5} "
              f"{'dyn_smem':>8}")
    if not args.json:
        print(f"triton {triton.__version__}, torch {torch.__version__}\n{header}\n" + "-" * len(header))
    n_spilled = 0
    for v in variants():
        for arch in args.arch:
            row = compile_variant(v, arch)
            n_spilled += spills(row)
            print(json.dumps(row) if args.json else
                  f"{row['kernel']:<24} {row['arch']:<7} {row['num_warps']:>5} {row['reg']:>4} {row['stack']:>5} "
                  f"{row['shared']:>6} {row['local']:>5} {row['dyn_smem']:>8}", flush=True)
    if n_spilled:
        print(f"{n_spilled} kernel(s) spill registers (STACK or LOCAL > 0) with triton {triton.__version__}",
              file=sys.stderr)
    return 1 if n_spilled else 0


if __name__ == "__main__":
    sys.exit(main())

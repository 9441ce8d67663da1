"""Shared fixtures: a small real-text corpus (the head of the gensim Wikipedia sample), a tiny config, helpers
for CLI runs, and the kernel parity rule. Without CUDA, Triton kernels run through its interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from train.config import DataConfig, tiny
from train.data import sample_path

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Every test compiles from scratch: dynamo's recompile limit (8 per code object) counts over the whole process,
    so the compiled models of earlier tests would use up a later test's allowance (fatal under fullgraph=True)."""
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="session")
def sample_file() -> Path:
    """The unpacked gensim sample (6,089,746 bytes) in the repository's data/ folder, where the trainer keeps it
    too; unpacked from gensim if it is not there yet (machines without gensim, like the GPU machines, carry it)."""
    return sample_path(DataConfig(source="sample", data_dir=str(REPO / "data")))


@pytest.fixture(scope="session")
def small_corpus(sample_file, tmp_path_factory) -> Path:
    """The first 200 kB of the sample: 180 kB train, 10 kB validation, 10 kB test."""
    path = tmp_path_factory.mktemp("corpus") / "wiki200k.txt"
    with open(sample_file, "rb") as f:
        path.write_bytes(f.read(200_000))
    return path


def tiny_config(corpus: Path, out_dir: Path, **overrides):
    """The tiny preset on `corpus`, with dotted overrides given as keyword arguments (model__n_layer=3)."""
    from train.config import set_value
    cfg = tiny()
    cfg.data.source, cfg.out_dir = str(corpus), str(out_dir)
    for key, value in overrides.items():
        set_value(cfg, key.replace("__", "."), value)
    return cfg


def run_cli(*args: str, module: str = "train", env: dict | None = None, timeout: float = 300):
    """Run `python -m <module> args...` from the repository root; returns the CompletedProcess. `env` adds
    variables to this process's environment (None as a value removes one)."""
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=environ)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_run(small_corpus, tmp_path_factory):
    """A finished 20-step run of the tiny preset through the CLI: (run folder, CompletedProcess)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = run_cli("--preset=tiny", f"--data.source={small_corpus}", f"--out_dir={out}", "--train.max_steps=20",
                "--train.log_interval=5", "--train.eval_interval=10")
    assert r.returncode == 0, r.stderr
    return out, r


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def snapshot(folder: Path) -> dict:
    """Every file below folder with its bytes: to check that a failed command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def permuted(t: torch.Tensor) -> torch.Tensor:
    """The same values in a dense but non-contiguous layout (the first two dimensions' strides swapped, the last
    dimension still unit-stride): what a transpose upstream of a kernel hands it."""
    out = t.detach().transpose(0, 1).contiguous().transpose(0, 1)
    assert not out.is_contiguous() and out.stride(-1) == 1 and torch.equal(out, t)
    return out.requires_grad_(t.requires_grad)


def assert_parity(name: str, out: torch.Tensor, same_dtype_ref: torch.Tensor, exact: torch.Tensor,
                  atol: float) -> None:
    """flash-attention's rule: the kernel's error against the exact (fp64) result is at most twice the error of
    the PyTorch reference computed in the kernel's dtype, plus a small atol."""
    assert out.shape == exact.shape and out.dtype == same_dtype_ref.dtype, (name, out.shape, out.dtype)
    err = (out.double() - exact).abs().max().item()
    ref_err = (same_dtype_ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + atol, f"{name}: error {err:.3g} > 2 x {ref_err:.3g} (PyTorch, same dtype) + {atol}"

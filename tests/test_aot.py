"""Every Triton kernel compiles ahead of time for A100 (sm_80) and H100 (sm_90a) without spilling registers, with
the installed triton here and with every supported version in CI (.ci/triton_versions)."""
import json
import re
import tomllib

import triton

from conftest import REPO, run_cli
from kernels.runtime import version_tuple


def test_every_kernel_compiles_for_both_archs_without_spills():
    r = run_cli("--json", module="kernels.aot", env={"TRITON_INTERPRET": None})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    kernels = {row["kernel"].split()[0] for row in rows}
    assert kernels == {"rmsnorm_fwd", "rmsnorm_bwd", "layernorm_fwd", "layernorm_bwd", "swiglu_fwd", "swiglu_bwd",
                       "mhce_fwd_bwd", "mhce_fwd", "mhce_gemm_rows_fwd_bwd", "mhce_gemm_rows_fwd"}
    for name in {row["kernel"] for row in rows}:
        assert sorted(row["arch"] for row in rows if row["kernel"] == name) == ["sm_80", "sm_90a"], name
    for row in rows:
        assert row["local"] == 0 and row["stack"] == 0, row  # no spills
        assert row["triton"] == triton.__version__, row  # the table names the compiler that made it


def test_aot_refuses_to_run_under_the_interpreter():
    r = run_cli(module="kernels.aot", env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 2 and "unset TRITON_INTERPRET" in r.stderr


def test_ci_checks_both_ends_of_the_declared_triton_range():
    """pyproject's triton dependency admits exactly the minor versions that .ci/triton_versions checks."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (spec,) = [d for d in pyproject["project"]["dependencies"] if re.match(r"triton\b", d)]
    lower = version_tuple(re.search(r">=\s*([\d.]+)", spec).group(1))
    upper = version_tuple(re.search(r"<\s*([\d.]+)", spec).group(1))
    checked = [version_tuple(v) for v in pyproject["tool"]["charlm"]["triton-versions"]]
    assert checked == sorted(set(checked)), checked
    assert checked[0] == lower and checked[-1] == (upper[0], upper[1] - 1), (spec, checked)
    assert "bash .ci/triton_versions" in (REPO / ".ci" / "run").read_text()

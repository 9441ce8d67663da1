"""Every Triton kernel compiles ahead of time for A100 (sm_80) and H100 (sm_90a) without spilling registers."""
import json

from conftest import run_cli


def test_every_kernel_compiles_for_both_archs_without_spills():
    r = run_cli("--json", module="kernels.aot", env={"TRITON_INTERPRET": None})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    kernels = {row["kernel"].split()[0] for row in rows}
    assert kernels == {"rmsnorm_fwd", "rmsnorm_bwd", "swiglu_fwd", "swiglu_bwd", "mhce_fwd_bwd", "mhce_fwd"}
    for name in {row["kernel"] for row in rows}:
        assert sorted(row["arch"] for row in rows if row["kernel"] == name) == ["sm_80", "sm_90a"], name
    for row in rows:
        assert row["local"] == 0 and row["stack"] == 0, row  # no spills
        assert 0 < row["reg"] <= 255, row


def test_aot_refuses_to_run_under_the_interpreter():
    r = run_cli(module="kernels.aot", env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 2 and "unset TRITON_INTERPRET" in r.stderr

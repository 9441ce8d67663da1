"""torchrun + DistributedDataParallel: 2 CPU ranks on gloo train exactly like one process with the same global
batch (every rank draws the same global batch and keeps its half), MoE's bias balancing included."""
import pytest
import torch

from conftest import read_metrics, run_cli

COMMON = ["--preset=tiny", "--train.max_steps=12", "--train.log_interval=1", "--train.eval_interval=6",
          "--train.batch_size=4", "--model.intermediate_loss=true", "--model.n_layer=3"]


MOE_BIAS = ["--model.moe_experts=4", "--model.moe_top_k=2", "--model.moe_balance=bias", "--model.moe_bias_rate=0.01"]


@pytest.mark.parametrize("accum, compile_, extra",
                         [(1, False, []), (2, False, []), (1, True, []), (1, False, MOE_BIAS)],
                         ids=["eager", "accum2", "compiled", "moe-bias"])
def test_two_ranks_match_one_process(small_corpus, tmp_path, accum, compile_, extra):
    """Through the step where the intermediate heads stop (their parameters are frozen and DDP wraps again), and
    compiled: DDP wrapped first, the compiler's DDPOptimizer splitting the graph at gradient buckets. With MoE's
    bias balancing the routing biases (buffers in the compared checkpoint) move by the loads of the global batch,
    summed over the ranks, as in one process."""
    args = COMMON + [f"--data.source={small_corpus}", f"--train.grad_accum={accum}", f"--train.compile={compile_}",
                     *extra]
    single = run_cli(*args, f"--out_dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr
    ddp = run_cli("--standalone", "--nproc_per_node=2", "-m", "train", *args, f"--out_dir={tmp_path / 'ddp'}",
                  module="torch.distributed.run", env={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr
    a, b = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert b[0]["world_size"] == 2 and a[0]["world_size"] == 1
    steps_a = [l for l in a if "event" not in l]
    steps_b = [l for l in b if "event" not in l]
    assert [l["step"] for l in steps_a] == [l["step"] for l in steps_b] == list(range(1, 13))
    for la, lb in zip(steps_a, steps_b):
        assert abs(la["train_loss"] - lb["train_loss"]) < 1e-4 * la["train_loss"], (la, lb)
        assert la["lr"] == lb["lr"]
        if "val_bpc" in la:
            assert abs(la["val_bpc"] - lb["val_bpc"]) < 1e-4 * la["val_bpc"]
    assert abs(a[-1]["full_val_bpc"] - b[-1]["full_val_bpc"]) < 1e-4 * a[-1]["full_val_bpc"]
    wa = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    if extra:
        assert any(k.endswith("route_bias") and wa[k].abs().max() > 0 for k in wa)


def test_time_budget_on_two_ranks_ends_every_rank_at_the_same_synchronisation_step(small_corpus, tmp_path):
    """Ranks read the clock only at log steps (agreeing on it there): the run ends at one, on every rank, and the
    learning rate and head weights follow that agreed clock (different ones would leave the ranks' models apart,
    or hang DDP when one rank drops the intermediate heads first)."""
    args = ["--preset=tiny", f"--data.source={small_corpus}", "--train.max_steps=0", "--train.max_time=4",
            "--train.log_interval=5", "--train.eval_interval=0", "--train.ckpt_interval=0", "--train.batch_size=4",
            "--model.intermediate_loss=true", "--model.n_layer=3", "--train.final_eval=false",
            f"--out_dir={tmp_path / 'ddp'}"]
    ddp = run_cli("--standalone", "--nproc_per_node=2", "-m", "train", *args, module="torch.distributed.run",
                  env={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr
    end = read_metrics(tmp_path / "ddp")[-1]
    assert end["event"] == "end" and end["step"] % 5 == 0 and end["train_time_s"] >= 4

"""train.fsdp=true: FSDP2 (fully_shard) on 2 CPU ranks over gloo trains like one process, and its checkpoints
(always full state dicts) resume on one process and the other way round."""
import torch

from conftest import read_metrics, run_cli

COMMON = ["--preset=tiny", "--train.schedule=constant", "--train.log_interval=1", "--train.eval_interval=0",
          "--train.batch_size=4", "--model.n_targets=2", "--model.target_weights=1.0,0.5"]


def torchrun(*args):
    return run_cli("--standalone", "--nproc_per_node=2", "-m", "train", *args, module="torch.distributed.run",
                   env={"OMP_NUM_THREADS": "1"})


def losses(run_dir, steps=None):
    return {r["step"]: r["train_loss"] for r in read_metrics(run_dir)
            if "train_loss" in r and "event" not in r and (steps is None or r["step"] in steps)}


def close(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]), (k, a[k], b[k])


def test_fsdp_matches_one_process_and_checkpoints_move_both_ways(small_corpus, tmp_path):
    data = f"--data.source={small_corpus}"
    whole = run_cli(*COMMON, data, "--train.max_steps=10", f"--out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr

    # FSDP for 5 steps, then one process for 5 more
    r = torchrun(*COMMON, data, "--train.max_steps=5", "--train.fsdp=true", f"--out_dir={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr
    assert read_metrics(tmp_path / "a")[0]["world_size"] == 2
    close(losses(tmp_path / "a"), losses(tmp_path / "whole", range(1, 6)))
    r = run_cli("--resume", f"--out_dir={tmp_path / 'a'}", "--train.max_steps=10", "--train.fsdp=false")
    assert r.returncode == 0, r.stderr
    close(losses(tmp_path / "a"), losses(tmp_path / "whole"))

    # one process for 5 steps, then FSDP for 5 more
    r = run_cli(*COMMON, data, "--train.max_steps=5", f"--out_dir={tmp_path / 'b'}")
    assert r.returncode == 0, r.stderr
    r = torchrun("--resume", f"--out_dir={tmp_path / 'b'}", "--train.max_steps=10", "--train.fsdp=true")
    assert r.returncode == 0, r.stderr
    close(losses(tmp_path / "b"), losses(tmp_path / "whole"))

    wa = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)["model"]
    for run in ("a", "b"):
        wb = torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["model"]
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_fsdp_needs_several_ranks(tmp_path):
    r = run_cli("--preset=tiny", "--train.fsdp=true", f"--out_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "train.fsdp=true needs torchrun with 2 or more ranks" in r.stderr

"""The trainer through its command line: outputs, resume, bad input, sampling."""
import hashlib
import json

import pytest
import torch

from conftest import REPO, copy_run, read_metrics, run_cli, tiny_config
from train.checkpoint import load_checkpoint
from train.config import Args
from train.loop import train


def test_run_writes_config_metrics_and_checkpoint(tiny_run, small_corpus):
    out, r = tiny_run
    config = json.loads((out / "config.json").read_text())
    assert set(config) == {"model", "train", "data", "log", "out_dir"} and config["train"]["max_steps"] == 20
    lines = read_metrics(out)
    start = lines[0]
    assert start["event"] == "start" and set(start) >= {"n_params", "dataset", "git_sha", "config"}
    assert start["config"] == config and start["dataset"]["path"] == str(small_corpus)
    assert start["dataset"]["bytes"] == 200_000 and len(start["dataset"]["sha256"]) == 64
    steps = [l for l in lines if "event" not in l]
    assert [l["step"] for l in steps] == [5, 10, 15, 20]
    assert all({"step", "train_loss", "lr", "tokens_per_s"} <= set(l) for l in steps)
    assert [l["step"] for l in steps if "val_bpc" in l] == [10, 20]
    assert all(l["val_protocol"] == "random windows, all positions" for l in steps if "val_bpc" in l)
    end = lines[-1]
    assert end["event"] == "end" and end["full_val_bpc"] > 0 and end["full_test_bpc"] > 0
    assert end["full_val_protocol"] == end["full_test_protocol"] == "strided, stride 8 of block 32"
    assert f"test {end['full_test_bpc']:.4f} bpc" in r.stdout and "(strided, stride 8 of block 32)" in r.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["config"] == config and ckpt["dataset"] == start["dataset"]
    assert ckpt["git_sha"] == start["git_sha"] and set(ckpt["rng"]) >= {"torch", "data"}
    assert "python -m train.evaluate --ckpt" in r.stdout and "python -m train.sample --ckpt" in r.stdout


def test_resume_continues_from_the_checkpoint(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("ckpt.pt", "metrics.jsonl", "config.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    r = run_cli("--resume", f"--out_dir={copy}", "--train.max_steps=30")
    assert r.returncode == 0, r.stderr
    lines = read_metrics(copy)
    resume = [l for l in lines if l.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 20 and resume[0]["config"]["train"]["max_steps"] == 30
    assert [l["step"] for l in lines if "event" not in l][-2:] == [25, 30]
    assert torch.load(copy / "ckpt.pt", weights_only=True)["step"] == 30


def test_resuming_past_the_budget_says_so_and_trains_nothing(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = copy_run(out, tmp_path / "copy")
    r = run_cli("--resume", f"--out_dir={copy}", "--train.max_steps=10", "--train.final_eval=false")
    assert r.returncode == 0, r.stderr
    assert "step 20: the budget is already spent; nothing to train" in r.stderr
    assert any(line.startswith("100%") for line in r.stderr.splitlines())  # the bar starts where the run is
    assert "done: 20 steps" in r.stdout
    assert torch.load(copy / "ckpt.pt", weights_only=True)["step"] == 20


def test_sample_cli_generates_bytes(tiny_run):
    out, _ = tiny_run
    r = run_cli("--ckpt", str(out / "ckpt.pt"), "--prompt", "The ", "--tokens", "40", "--seed", "1",
                module="train.sample")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The ") and "bytes/s" in r.stderr
    again = run_cli("--ckpt", str(out / "ckpt.pt"), "--prompt", "The ", "--tokens", "40", "--seed", "1",
                    module="train.sample")
    assert again.stdout == r.stdout  # seeded


@pytest.mark.parametrize("pos_emb", ["learned", "learned_per_layer", "rope"])
def test_greedy_sampling_is_the_same_with_and_without_the_cache(pos_emb):
    from model import GPT, ModelConfig
    from train.sample import generate
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, block_size=16, pos_emb=pos_emb)).eval()
    prompt = b"Once upon a time, "  # longer than the window: generation starts by moving it
    cached = generate(model, prompt, 60, temperature=0)
    uncached = generate(model, prompt, 60, temperature=0, use_cache=False)
    assert len(cached) == 60 and cached == uncached


def test_greedy_sampling_from_a_short_prompt_reads_all_of_it():
    """A prompt shorter than the window: each greedy byte is the argmax after a full forward over the whole prompt
    and what came after it, first byte included, with the cache and without."""
    from model import GPT, ModelConfig
    from train.sample import generate
    torch.manual_seed(4)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, block_size=16, pos_emb="rope")).eval()
    seq = list(b"Xyz")
    with torch.no_grad():
        for _ in range(8):  # 3 + 8 bytes: the window never moves
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    for use_cache in (True, False):
        assert generate(model, b"Xyz", 8, temperature=0, use_cache=use_cache) == bytes(seq[3:])


def test_sampling_draws_only_among_the_top_k_and_greedy_takes_the_largest():
    from train.sample import pick
    logits = torch.randperm(256).float() * 0.3  # distinct, 0.3 apart
    top = set(torch.topk(logits, 5).indices.tolist())
    generator = torch.Generator().manual_seed(0)
    drawn = [pick(logits, 1.0, 5, generator) for _ in range(2000)]
    assert set(drawn) == top  # every one of the 5, nothing else
    assert pick(logits, 0.0, 0, None) == int(logits.argmax())
    hot = [pick(logits, 100.0, 0, generator) for _ in range(2000)]
    assert len(set(hot)) > 200  # a high temperature flattens the distribution over all 256 bytes


def test_sample_cli_no_cache_matches(tiny_run):
    out, _ = tiny_run
    args = ("--ckpt", str(out / "ckpt.pt"), "--prompt", "The ", "--tokens", "80", "--temperature", "0")
    cached, uncached = run_cli(*args, module="train.sample"), run_cli(*args, "--no_cache", module="train.sample")
    assert cached.returncode == uncached.returncode == 0, cached.stderr + uncached.stderr
    assert cached.stdout == uncached.stdout and "KV cache" in cached.stderr and "no cache" in uncached.stderr


def test_help_lists_the_knobs():
    r = run_cli("--help")
    assert r.returncode == 0 and "--model.n_layer" in r.stdout and "--train.max_time" in r.stdout


def test_final_evaluation_can_be_skipped_and_its_batch_and_stride_set(small_corpus, tmp_path, monkeypatch):
    import train.loop as loop
    from conftest import tiny_config
    from train.config import Args
    calls = []
    real = loop.evaluate_bytes
    monkeypatch.setattr(loop, "evaluate_bytes", lambda *a, **k: calls.append((a[5], a[6])) or real(*a, **k))
    cfg = tiny_config(small_corpus, tmp_path / "a", train__max_steps="2", train__eval_interval="0",
                      train__full_eval_interval="0", train__final_eval="false")
    final = loop.train(Args(cfg, "tiny"))
    assert calls == [] and "full_val_bpc" not in final and "full_test_bpc" not in final
    cfg = tiny_config(small_corpus, tmp_path / "b", train__max_steps="2", train__eval_interval="0",
                      train__full_eval_interval="0", train__eval_stride="4", train__eval_batch_size="7")
    final = loop.train(Args(cfg, "tiny"))
    assert calls == [(4, 7), (4, 7)] and final["full_val_protocol"] == "strided, stride 4 of block 32"
    default = tiny_config(small_corpus, tmp_path / "c")
    assert default.train.eval_batch_size == 0 and default.train.eval_stride == 0  # 4 x batch_size, block / 4


def test_profile_writes_a_chrome_trace_of_the_asked_steps(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "run", train__profile=3, train__max_steps=12, train__final_eval="false")
    train(Args(cfg, "tiny"))
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    assert any("aten::" in e.get("name", "") for e in trace["traceEvents"])  # the steps' operators
    assert {"event": "profile", "steps": 3, "trace": str(tmp_path / "run" / "trace.json")} in read_metrics(
        tmp_path / "run")
    text = (tmp_path / "run" / "profile.txt").read_text()
    assert text.startswith("3 steps traced: ") and "ms wall time per step" in text and "self CPU time" in text
    assert "aten::" in text  # the table of the top operators


def test_the_gpu_profile_summary_adds_kernel_time_by_family_without_annotations():
    """profile.txt's GPU branch on made-up events (2 steps, 10 ms wall): kernels only, record_function ranges
    (user annotations, which span kernels) and CPU operators left out of the busy time."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from train.profiler import summary_text

    class Events(list):
        def table(self, sort_by, row_limit, max_name_column_width):
            return f"table sorted by {sort_by}"

    def event(key, us, device=DeviceType.CUDA, annotation=False, count=2):
        return SimpleNamespace(key=key, self_device_time_total=us, device_type=device, is_user_annotation=annotation,
                               count=count)
    events = Events([event("sm90_xmma_gemm_bf16", 8000), event("triton_poi_fused_add_0", 2000),
                     event("_mhce_kernel", 1000), event("ProfilerStep#5", 9000, annotation=True),
                     event("aten::mm", 8000, device=DeviceType.CPU)])
    text = summary_text(events, steps=2, seconds=0.02, cuda=True)
    assert text.startswith("2 steps traced: 10.00 ms wall time per step")
    assert "GPU busy 5.50 ms per step (55% of the wall time" in text and "3 kernels per step" in text
    assert "matmul" in text and "4.00 ms" in text and "charlm Triton kernels" in text
    assert "table sorted by self_device_time_total" in text
    assert "no GPU kernels recorded" in summary_text(Events([event("aten::mm", 1, DeviceType.CPU)]), 1, 1.0, True)


def test_gpu_kernels_fall_into_families():
    from train.profiler import kernel_family
    assert kernel_family("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_family("nvjet_tst_128x64_64x6_1x1_v_bz_coopA_TNT") == "matmul"
    assert kernel_family("triton_tem_fused_mm_3") == "matmul"
    assert kernel_family("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kernel_family("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert kernel_family("triton_per_fused_native_layer_norm_7") == "inductor (fused pointwise and reductions)"
    assert kernel_family("_ce_rows_kernel") == "charlm Triton kernels"
    assert kernel_family("Memcpy HtoD (Pinned -> Device)") == "copies and fills"
    assert kernel_family("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") \
        == "copies and fills"
    assert kernel_family("void at::native::reduce_kernel<512, 1>") == "ATen (eager) kernels"
    assert kernel_family("something_else") == "other"


def test_activation_checkpointing_changes_no_loss_and_no_weight(small_corpus, tmp_path, monkeypatch):
    """With dropout on (the recomputation must replay the same masks) and intermediate heads: the same losses at
    every step and the same final weights, under the same state-dict keys; the blocks do run twice."""
    from model.block import Block
    calls, forward = [], Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    runs, block_calls = {}, {}
    for ac in (False, True):
        calls.clear()
        cfg = tiny_config(small_corpus, tmp_path / str(ac), train__activation_checkpointing=str(ac),
                          model__dropout=0.2, model__intermediate_loss="true", model__n_layer=3,
                          train__max_steps=8, train__final_eval="false")
        train(Args(cfg, "tiny"))
        runs[ac] = ([r["train_loss"] for r in read_metrics(tmp_path / str(ac)) if "train_loss" in r and
                     "event" not in r], torch.load(tmp_path / str(ac) / "ckpt.pt", weights_only=True)["model"])
        block_calls[ac] = len(calls)
    assert block_calls[True] == block_calls[False] + 8 * 3  # 8 steps x 3 blocks recomputed in the backward
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 8
    assert runs[True][1].keys() == runs[False][1].keys()
    for k in runs[False][1]:
        torch.testing.assert_close(runs[True][1][k], runs[False][1][k], rtol=0, atol=0, msg=k)


def test_a_run_folder_in_use_is_refused_and_a_dead_holders_lock_is_not(small_corpus, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from train.lock import RunLock; lock = RunLock(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["--preset=tiny", f"--data.source={small_corpus}", f"--out_dir={out}", "--train.max_steps=3",
                "--train.final_eval=false", "--overwrite"]
        r = run_cli(*args)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1] == (f"error: {out} is in use by another run (process {holder.pid}); "
                                                     "wait for it to end or stop it first")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    r = run_cli(*args)  # the kernel dropped the killed holder's lock
    assert r.returncode == 0, r.stderr
    assert read_metrics(out)[-1]["event"] == "end"


def test_a_token_budget_ends_at_its_step_and_is_logged_there(small_corpus, tmp_path):
    tokens_per_step = 4 * 32  # tiny: batch 4 x block 32
    cfg = tiny_config(small_corpus, tmp_path / "run", train__max_steps=0, train__max_tokens=7 * tokens_per_step - 5,
                      train__log_interval=5, train__final_eval="false")
    final = train(Args(cfg, "tiny"))
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "event" not in r and "train_loss" in r]
    assert final["step"] == 7 and steps == [5, 7]


def test_a_time_budget_counts_the_optimiser_step(small_corpus, tmp_path, monkeypatch):
    """The update is part of the step's time: with an optimiser step that takes 50 ms, a 0.6 s budget ends after
    at most 12 steps (when the clock stopped before the update, the tiny model ran ~100 steps in it)."""
    import time
    plain_step = torch.optim.AdamW.step

    def slow_step(self, *args, **kwargs):
        time.sleep(0.05)
        return plain_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", slow_step)
    cfg = tiny_config(small_corpus, tmp_path / "run", train__max_steps=0, train__max_time=0.6,
                      train__final_eval="false", train__eval_interval=0)
    final = train(Args(cfg, "tiny"))
    assert 1 <= final["step"] <= 12 and final["train_time_s"] >= 0.05 * final["step"]


def test_bf16_autocast_trains_on_a_cpu(small_corpus, tmp_path, monkeypatch):
    """train.precision=bf16 on a CPU (allowed where it computes bf16 natively; allowed here on any CPU, where
    autocast emulates it): the linear layers run in bf16, the loss falls as in fp32 and differs from it."""
    import train.config as config_module
    monkeypatch.setattr(config_module, "cpu_has_bf16", lambda: True)
    dtypes = set()

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and module.training:
            dtypes.add(output.dtype)

    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(small_corpus, tmp_path / precision, train__precision=precision, train__device="cpu",
                          train__max_steps=30, train__final_eval="false")
        handle = torch.nn.modules.module.register_module_forward_hook(record)
        try:
            train(Args(cfg, "tiny"))
        finally:
            handle.remove()
        losses[precision] = [r["train_loss"] for r in read_metrics(tmp_path / precision)
                             if "train_loss" in r and "event" not in r]
        assert dtypes == {torch.float32 if precision == "fp32" else torch.bfloat16}
        dtypes.clear()
    assert losses["bf16"][-1] < losses["bf16"][0] - 0.5
    assert losses["bf16"] != losses["fp32"]


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(small_corpus, tmp_path):
    r = run_cli("--preset=tiny", f"--data.source={small_corpus}", f"--out_dir={tmp_path / 'run'}",
                "--train.max_steps=30")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    bars = [line for line in r.stderr.splitlines() if "%|" in line]
    training = [line for line in bars if not line.startswith("eval")]
    assert len(training) == 2 and training[-1].startswith("100%"), bars  # the start and the end: no redraws
    assert len(bars) - len(training) <= 4, bars  # the two final evaluations: a line or two each


def test_every_active_heads_loss_is_logged_and_plotted(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "run", model__n_layer=3, model__intermediate_loss="true",
                      model__n_targets=2, model__target_weights="1.0,0.5", model__intermediate_targets=2,
                      train__max_steps=12, train__log_interval=1, train__final_eval="false")
    train(Args(cfg, "tiny"))
    lines = [r for r in read_metrics(tmp_path / "run") if "train_loss" in r and "event" not in r]
    inter = {f"loss/L{l}/t+{k}" for l in (1, 2) for k in (1, 2)}
    final = {"loss/final/t+1", "loss/final/t+2"}
    # layer l's heads count while progress < l/6 (progress = steps done / 12): steps 1-2 (layers 1 and 2), 3-4
    # (layer 2), then the final heads only
    assert {k for k in lines[0] if k.startswith("loss/")} == inter | final
    assert {k for k in lines[2] if k.startswith("loss/")} == {"loss/L2/t+1", "loss/L2/t+2"} | final
    assert {k for k in lines[-1] if k.startswith("loss/")} == final
    for r in lines:  # the t+1 head's loss is the train loss
        assert abs(r["loss/final/t+1"] - r["train_loss"]) < 1e-5 * r["train_loss"]
    r = run_cli(str(tmp_path / "run"), "--out", str(tmp_path / "curves.png"), module="train.plot")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_gradients_are_clipped_to_grad_clip_and_the_norm_before_clipping_is_returned(small_corpus, tmp_path,
                                                                                     grad_clip):
    from train.loop import Run
    run = Run(Args(tiny_config(small_corpus, tmp_path / "run", train__grad_clip=str(grad_clip)), "tiny"))
    try:
        torch.manual_seed(0)
        for p in run.raw.parameters():
            p.grad = torch.randn_like(p)
        before = torch.cat([p.grad.flatten() for p in run.raw.parameters()]).norm()
        if not grad_clip:
            assert run.grad_norm(want=False) is None  # nothing to clip and nothing logged: not even computed
        norm = run.grad_norm(want=True)
        after = torch.cat([p.grad.flatten() for p in run.raw.parameters()]).norm()
        torch.testing.assert_close(norm, before)
        torch.testing.assert_close(after, torch.tensor(grad_clip) if grad_clip else before, rtol=1e-4, atol=0)
    finally:
        run.close()


def test_accumulated_micro_batches_give_the_gradient_of_their_whole_batch(small_corpus, tmp_path, monkeypatch):
    """grad_accum=2 of batch 2 is batch 4: the accumulated gradient is the whole batch's, each micro-batch's loss
    scaled by 1/grad_accum (Adam would all but hide a gradient twice as large; SGD, the t12 recipe, follows it)."""
    import copy

    from train.data import BatchPrefetcher
    from train.guard import StopOnSignal
    from train.loop import Run
    cfg = tiny_config(small_corpus, tmp_path / "run", train__grad_accum="2", train__batch_size="2",
                      train__optimizer="sgd", train__momentum="0", train__weight_decay="0", train__grad_clip="0")
    run = Run(Args(cfg, "tiny"))
    try:
        start = copy.deepcopy(run.raw)
        drawn, draw = [], BatchPrefetcher.next
        monkeypatch.setattr(BatchPrefetcher, "next", lambda self: drawn.append(draw(self)) or drawn[-1])
        run.train_step(StopOnSignal(verbose=False))
        assert len(drawn) == 2
        x, y = (torch.cat([batch[i] for batch in drawn]) for i in (0, 1))
        start(x, y, run.head_weights())[0].backward()
        for (name, p), q in zip(run.raw.named_parameters(), start.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    finally:
        run.close()


def test_a_resume_applies_overridden_optimiser_settings_and_keeps_the_saved_moments(tiny_run, small_corpus, tmp_path):
    """--resume --train.weight_decay=0.5 --train.beta2=0.9: the resumed optimiser runs with the new settings (the
    ones its config.json records), while its moments are the checkpoint's. torch's load_state_dict alone would
    have put the saved settings back."""
    from train.loop import Run
    out = copy_run(tiny_run[0], tmp_path / "run")
    saved = load_checkpoint(out / "ckpt.pt")["optimizer"]
    overrides = {"train.weight_decay": "0.5", "train.beta2": "0.9", "train.max_steps": "30"}
    run = Run(Args(tiny_config(small_corpus, out), "tiny", resume=True, overrides=overrides))
    try:
        groups = run.optimizer.param_groups
        assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.5]
        assert {tuple(g["betas"]) for g in groups} == {(0.9, 0.9)}
        assert run.config["train"]["weight_decay"] == 0.5 and run.config["train"]["beta2"] == 0.9
        for name, p in run.raw.named_parameters():
            torch.testing.assert_close(run.optimizer.state[p]["exp_avg"], saved["state"][name]["exp_avg"],
                                       rtol=0, atol=0)
            torch.testing.assert_close(run.optimizer.state[p]["exp_avg_sq"], saved["state"][name]["exp_avg_sq"],
                                       rtol=0, atol=0)
        assert all(float(run.optimizer.state[p]["exp_avg_sq"].abs().sum()) > 0 for p in run.raw.parameters())
    finally:
        run.close()


def test_a_resume_on_another_dataset_is_said_and_logged(tiny_run, small_corpus, tmp_path, capsys):
    """Resuming on another corpus is allowed (fine-tuning) but not silent: a warning names both datasets, and the
    resume event logs the new one; resuming on the same corpus says nothing."""
    from train.loop import Run
    other = tmp_path / "other.txt"
    other.write_bytes(small_corpus.read_bytes()[::-1])
    for source, warned in ((small_corpus, False), (other, True)):
        out = copy_run(tiny_run[0], tmp_path / f"run-{other == source}")
        run = Run(Args(tiny_config(small_corpus, out), "tiny", resume=True, overrides={"data.source": str(source)}))
        run.close()
        err = capsys.readouterr().err
        assert ("warning: resuming on other.txt" in err and f"dataset {small_corpus.name} (sha256" in err) == warned
        assert read_metrics(out)[-1]["event"] == "resume"
        assert read_metrics(out)[-1]["dataset"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()

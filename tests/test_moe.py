"""Mixture of experts (model.moe_experts): one expert with top-1 is the dense MLP; the sorted dispatch (padded and
grouped) equals the loop over experts (outputs and every gradient) and compiles with fullgraph; the router learns;
the balance loss; bias balancing evens out a skewed router and moves the choice, not the gates; layout knobs; and
a short training run logging expert loads; the trainer's expert-load sums (micro-batches, steps, log lines,
checkpoint) against hand-computed values."""
import copy
import math

import pytest
import torch

from conftest import read_metrics, tiny_config
from model import GPT, ModelConfig
from model.layers import make_mlp
from model.moe import MoE
from train.config import Args
from train.loop import train


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=2, d_model=20, d_ff=36, block_size=11, moe_experts=5,
                                 moe_top_k=2, moe_expert_dim=12), **kw})


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_one_expert_with_top_1_is_the_dense_mlp(activation):
    torch.manual_seed(0)
    cfg = small(moe_experts=1, moe_top_k=1, moe_expert_dim=0, activation=activation, bias=False)
    moe, dense = MoE(cfg), make_mlp(cfg)
    with torch.no_grad():
        for p in (*moe.parameters(), *dense.parameters()):
            p.normal_()
        first = dense.gate_up if activation == "swiglu" else dense.fc
        moe.fc.copy_(first.weight.t()[None])
        moe.proj.copy_(dense.proj.weight.t()[None])
    x = torch.randn(3, 11, 20)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_shared", [1, 2])
def test_shared_experts_add_one_ordinary_mlp_to_the_routed_sum(n_shared):
    """moe_shared always-on experts: the output is the routed experts' gated sum plus one MLP of n_shared x
    moe_expert_dim, which sees every token."""
    torch.manual_seed(6)
    moe = MoE(small(moe_shared=n_shared))
    x = torch.randn(2, 11, 20)
    flat = x.reshape(-1, 20)
    _, choice, gates = moe.route(flat)
    assert moe.shared.proj.weight.shape == (20, 12 * n_shared)
    torch.testing.assert_close(moe(x).reshape(-1, 20), moe.reference(flat, choice, gates) + moe.shared(flat),
                               rtol=1e-5, atol=1e-6)


def test_the_route_bias_moves_the_choice_but_not_the_gates():
    """DeepSeek-V3's balancing bias takes part in selection only: an expert it forces into every token's top k is
    weighted by its router probability alone, and the other experts keep theirs."""
    torch.manual_seed(2)
    moe = MoE(small(moe_top_k=2))
    with torch.no_grad():
        moe.route_bias[3] = 5.0
    x = torch.randn(29, 20)
    probs, choice, gates = moe.route(x)
    expected = torch.softmax(moe.router(x).float(), dim=-1)
    assert (choice == 3).any(dim=1).all()
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(gates, expected.gather(1, choice))
    assert float(gates.max()) < 1.0


@pytest.mark.parametrize("dispatch", ["padded", "grouped"])
@pytest.mark.parametrize("top_k,shared,activation", [(1, 0, "gelu"), (2, 1, "swiglu"), (3, 2, "relu")])
def test_dispatch_equals_the_loop_over_experts_with_every_gradient(top_k, shared, activation, dispatch):
    """The sorted dispatch against the loop over experts, outputs and the gradients of the input, both expert
    matrices and the router: the padded one in fp64 (1e-10), the grouped one (torch's grouped matmul has no fp64) in
    fp32 against the fp64 loop. A router bias keeps expert 0 empty: a group of no rows."""
    torch.manual_seed(1)
    moe = MoE(small(moe_top_k=top_k, moe_shared=shared, activation=activation, moe_dispatch=dispatch)).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.3)
        moe.route_bias[0] = -2.0
    x = torch.randn(37, 20, dtype=torch.float64)
    grad_out = torch.randn(37, 20, dtype=torch.float64)

    def run(module, fn_name, dtype):
        module = module.to(dtype)
        inputs = x.to(dtype).requires_grad_()
        _, choice, gates = module.route(inputs)
        assert not (choice == 0).any()
        out = getattr(module, fn_name)(inputs, choice, gates.to(dtype))
        grads = torch.autograd.grad(out, [inputs, module.fc, module.proj, module.router.weight], grad_out.to(dtype))
        return [t.double() for t in (out, *grads)]
    loop = run(copy.deepcopy(moe), "reference", torch.float64)
    fast = run(copy.deepcopy(moe), "dispatch", torch.float64 if dispatch == "padded" else torch.float32)
    tolerance = 1e-10 if dispatch == "padded" else 2e-5
    for name, a, b in zip(["out", "x", "fc", "proj", "router"], fast, loop):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)
    assert fast[2][0].abs().max() == 0 and fast[3][0].abs().max() == 0  # the empty expert gets no gradient


def test_auto_dispatch_takes_the_grouped_matmul_where_torch_runs_it(monkeypatch):
    """model.moe_dispatch=auto: grouped for fp32 on a CPU (eager) and for 16-byte-aligned bf16 rows, padded for
    fp64 and for rows of other widths; grouped where it cannot run is a one-line error."""
    from model.moe import grouped_supported
    cpu = torch.device("cpu")
    assert grouped_supported(cpu, torch.float32, 20, 24, 12)
    assert grouped_supported(cpu, torch.bfloat16, 24, 32, 16)
    assert not grouped_supported(cpu, torch.bfloat16, 20, 24, 12)  # 40-byte rows
    assert not grouped_supported(cpu, torch.float32, 21, 24, 12)
    assert not grouped_supported(cpu, torch.float64, 20, 24, 12)
    calls = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    MoE(small())(torch.randn(2, 11, 20))
    assert len(calls) == 2  # both expert matmuls
    MoE(small(moe_dispatch="padded"))(torch.randn(2, 11, 20))
    MoE(small()).double()(torch.randn(2, 11, 20, dtype=torch.float64))
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match=r"model.moe_dispatch=grouped: .* use auto or padded"):
        MoE(small(moe_dispatch="grouped")).double()(torch.randn(2, 11, 20, dtype=torch.float64))


def test_on_cuda_the_grouped_matmul_needs_bf16_and_sm80_or_newer(monkeypatch):
    """The capability table behind auto on CUDA (the card faked: no GPU needed); other device types: padded."""
    from types import SimpleNamespace
    from model.moe import grouped_supported
    cuda = torch.device("cuda")
    for major, runs in [(7, False), (8, True), (9, True), (10, True)]:
        card = SimpleNamespace(major=major)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, card=card: card)
        assert grouped_supported(cuda, torch.bfloat16, 24, 32, 16) is runs
        assert not grouped_supported(cuda, torch.float32, 24, 32, 16)
        assert not grouped_supported(cuda, torch.bfloat16, 20, 32, 16)  # 40-byte rows
    assert not grouped_supported(torch.device("meta"), torch.bfloat16, 24, 32, 16)


def test_the_dispatch_compiles_with_fullgraph():
    """fp32: compiled, auto takes the padded dispatch (torch's grouped matmul compiles only in bf16); bf16 rows of
    16-byte multiples: the grouped one, compiled against eager within bf16 rounding."""
    torch.manual_seed(2)
    moe = MoE(small())
    x = torch.randn(2, 11, 20)
    compiled = torch.compile(moe, fullgraph=True)
    torch.testing.assert_close(compiled(x), moe(x), rtol=1e-5, atol=1e-5)
    moe = MoE(small(d_model=24, moe_expert_dim=16, moe_dispatch="grouped")).bfloat16()
    x = torch.randn(2, 11, 24, dtype=torch.bfloat16)
    torch.testing.assert_close(torch.compile(moe, fullgraph=True)(x), moe(x), rtol=2e-2, atol=2e-2)


def test_the_balance_loss_and_router_gradients():
    """E * sum_i f_i P_i from the routed counts and the mean probabilities; at aux_weight w it joins the model's
    loss, and the router gets gradient from the gates and from it."""
    torch.manual_seed(3)
    model = GPT(small(moe_aux_weight=0.5))
    x, y = torch.randint(0, 256, (4, 11)), torch.randint(0, 256, (4, 11))
    loss, _ = model(x, y, torch.tensor([1.0]))
    moe = model.moe_layers[0]
    h = model.blocks[0].norm2(model.blocks[0].attn(model.blocks[0].norm1(model.pos_emb(model.tok_emb(x)))) +
                              model.pos_emb(model.tok_emb(x))).reshape(-1, 20)
    probs, choice, _ = moe.route(h)
    f = torch.bincount(choice.flatten(), minlength=5).float() / choice.numel()
    expected = 5 * (f * probs.mean(0)).sum()
    assert torch.equal(moe.routing.counts, torch.bincount(choice.flatten(), minlength=5).float())
    torch.testing.assert_close(moe.routing.balance, expected.detach(), rtol=1e-5, atol=1e-6)
    plain, _ = model(x, y, None)  # evaluation path: no balance loss
    assert float(loss) > float(plain)
    loss.backward()
    assert all(float(m.router.weight.grad.abs().max()) > 0 for m in model.moe_layers)


@pytest.mark.parametrize("balance,training,joins", [("aux_loss", True, True), ("aux_loss", False, False),
                                                    ("bias", True, False)])
def test_the_balance_loss_joins_the_loss_only_when_training_with_aux_loss(balance, training, joins):
    """The model's loss is its heads' weighted loss plus aux_weight x the balance loss of every MoE layer in training
    with aux_loss balancing, and the heads' loss alone in evaluation or with bias balancing."""
    torch.manual_seed(5)
    model = GPT(small(n_layer=3, moe_balance=balance, moe_aux_weight=0.3)).train(training)
    x, y = torch.randint(0, 256, (3, 11)), torch.randint(0, 256, (3, 11))
    loss, per_head = model(x, y, torch.tensor([1.0]))
    balance_terms = sum(0.3 * moe.routing.balance for moe in model.moe_layers) if joins else 0.0
    assert len(model.moe_layers) == 3 and all(float(moe.routing.balance) > 0.5 for moe in model.moe_layers)
    torch.testing.assert_close(loss.detach(), per_head[0] + balance_terms, rtol=1e-6, atol=0)


def test_bias_balancing_evens_out_a_skewed_router():
    """A router that sends most tokens to expert 0 (max/mean load ~2.4): after 300 updates of 0.002 the loads are
    near even (sign updates keep oscillating by about one step), the gates untouched by the bias."""
    torch.manual_seed(4)
    moe = MoE(small(moe_balance="bias"))
    with torch.no_grad():
        moe.router.weight.normal_(std=0.2)
        moe.router.weight[0] += 0.3
    x = torch.randn(2000, 20) + 0.5

    def max_over_mean():
        counts = torch.bincount(moe.route(x)[1].flatten(), minlength=5).float()
        return float(counts.max() / counts.mean()), counts
    before, counts = max_over_mean()
    probs_before = moe.route(x)[0]
    history = []
    for _ in range(300):
        moe.update_bias(counts, rate=0.002)
        after, counts = max_over_mean()
        history.append(after)
    assert before > 2.0 and sum(history[-50:]) / 50 < 1.3
    assert torch.equal(moe.route(x)[0], probs_before)  # the bias moves the choice, not the probabilities
    assert float(moe.route_bias.abs().max()) > 0 and "route_bias" in moe.state_dict()


def test_moe_every_and_parameters():
    model = GPT(small(n_layer=4, moe_every=2, moe_shared=1))
    kinds = [type(block.mlp).__name__ for block in model.blocks]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]
    per_moe = 20 * 5 + 5 * (20 * 12 + 12 * 20) + (20 * 12 + 12 + 12 * 20 + 20)  # router, experts, shared (biases)
    dense = GPT(small(n_layer=4, moe_experts=0))
    dense_mlp = 20 * 36 + 36 + 36 * 20 + 20
    assert model.num_params() == dense.num_params() + 2 * (per_moe - dense_mlp)


@pytest.mark.parametrize("balance", ["aux_loss", "bias"])
def test_a_short_run_logs_expert_loads(balance, small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "run", model__moe_experts="4", model__moe_top_k="2",
                      model__moe_balance=balance, train__max_steps="60", train__log_interval="10")
    train(Args(cfg, "tiny"))
    lines = [r for r in read_metrics(tmp_path / "run") if "moe/load" in r]
    assert len(lines) == 6
    for r in lines:
        assert len(r["moe/load"]) == 4 and math.isclose(sum(r["moe/load"]), 1.0, abs_tol=1e-3)
        assert r["moe/load_max_over_mean"] >= 1.0 and r["moe/balance_loss"] > 0
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "run") if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5
    state = torch.load(tmp_path / "run" / "ckpt.pt")["model"]
    biases = [v for k, v in state.items() if k.endswith("route_bias")]
    assert len(biases) == 2 and (any(float(b.abs().max()) > 0 for b in biases) == (balance == "bias"))


def test_a_run_with_bias_balancing_resumes_bit_for_bit(small_corpus, tmp_path):
    """60 steps against the same run stopped at step 45 and resumed: losses and expert loads of every logged step
    equal exactly, so the routing biases (moved after every step, not by gradient) resume with the checkpoint."""
    common = dict(model__moe_experts="4", model__moe_top_k="2", model__moe_balance="bias",
                  model__moe_bias_rate="0.01", model__dropout="0.1", train__schedule="constant",
                  train__warmup_steps="0", train__log_interval="3",
                  train__ckpt_interval="45", train__eval_interval="0", train__final_eval="false")
    train(Args(tiny_config(small_corpus, tmp_path / "whole", train__max_steps="60", **common), "tiny"))
    train(Args(tiny_config(small_corpus, tmp_path / "cut", train__max_steps="45", **common), "tiny"))
    resumed = tiny_config(small_corpus, tmp_path / "cut", train__max_steps="60", **common)
    train(Args(resumed, "tiny", resume=True, overrides={"train.max_steps": "60"}))

    def logged(run):
        return [(r["step"], r["train_loss"], r["moe/load"]) for r in read_metrics(run) if "moe/load" in r]
    assert logged(tmp_path / "cut") == logged(tmp_path / "whole") and len(logged(tmp_path / "whole")) == 20
    assert logged(tmp_path / "whole")[-1][2] != logged(tmp_path / "whole")[0][2]


@pytest.mark.parametrize("overrides,message", [
    (dict(moe_top_k=6), "model.moe_top_k=6 must be between 1 and model.moe_experts=5"),
    (dict(moe_every=0), "model.moe_every >= 1"),
    (dict(activation="solu"), "solu is not implemented for experts"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    errors = small(**overrides).errors()
    assert len(errors) == 1 and message in errors[0], errors


class FakeMoELayer:
    """What ExpertLoads reads of a MoE layer: its routing result after a forward, and the bias update it asks for."""
    n_experts = 3

    def __init__(self):
        self.routing, self.updates = type("Routing", (), {})(), []

    def route(self, counts, balance):
        self.routing.counts, self.routing.balance = torch.tensor(counts, dtype=torch.float32), torch.tensor(balance)

    def update_bias(self, counts, rate):
        self.updates.append((counts.tolist(), rate))


def test_expert_loads_sum_micro_batches_and_steps_into_the_logged_loads():
    """Two layers, a step of two micro-batches and a step of one: each step's counts reach the bias update, the log
    line averages the per-layer fractions, the busiest expert over the mean and the balance loss per step; the sums
    reset at the log line and survive a checkpoint round trip."""
    from train.experts import ExpertLoads
    first, second = FakeMoELayer(), FakeMoELayer()
    loads = ExpertLoads([first, second], torch.device("cpu"), "bias", 0.01, world=1)
    for micro_batches in ([([2, 1, 1], 1.2), ([0, 4, 0], 3.0)], [([1, 1, 2], 1.0), ([4, 0, 0], 2.0)]), \
                         ([([1, 1, 1], 1.0), ([1, 1, 1], 1.0)],):
        loads.start_step()
        for (counts_1, balance_1), (counts_2, balance_2) in micro_batches:
            first.route(counts_1, balance_1)
            second.route(counts_2, balance_2)
            loads.add_micro_batch(len(micro_batches))
        loads.after_update()
    assert first.updates == [([3, 2, 3], 0.01), ([1, 1, 1], 0.01)]
    assert second.updates == [([4, 4, 0], 0.01), ([1, 1, 1], 0.01)]
    restored = ExpertLoads([FakeMoELayer(), FakeMoELayer()], torch.device("cpu"), "bias", 0.01, world=1)
    restored.restore(loads.state())
    for record in (loads.record(steps=2), restored.record(steps=2)):
        # counts [4, 3, 4] and [5, 5, 1] of 11 slots; balance per step (1.2 + 1.0) / 2 + 1.0 and (3 + 2) / 2 + 1.0
        assert record["moe/load"] == [round(9 / 22, 4), round(8 / 22, 4), round(5 / 22, 4)]
        assert math.isclose(record["moe/load_max_over_mean"], (12 / 11 + 15 / 11) / 2, rel_tol=1e-6)
        assert math.isclose(record["moe/balance_loss"], (2.1 + 3.5) / 2 / 2, rel_tol=1e-6)
    assert loads.record(steps=1) == {"moe/load": [0.0, 0.0, 0.0], "moe/load_max_over_mean": 0.0,
                                     "moe/balance_loss": 0.0}
    dense = ExpertLoads([], torch.device("cpu"), "bias", 0.01, world=1)  # no MoE layer: every method a no-op
    dense.start_step()
    dense.add_micro_batch(1)
    dense.after_update()
    assert not dense and dense.counts.numel() == 0

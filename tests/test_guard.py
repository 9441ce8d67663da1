"""Signal handling and the non-finite guard."""
import math
import signal

import pytest
import torch

from conftest import read_metrics, tiny_config
from model import GPT
from train.config import Args
from train.guard import NonFiniteFlag, StopOnSignal, TrainingError
from train.loop import train


def test_first_signal_asks_to_stop_and_a_second_one_interrupts_at_once():
    ambient = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever an earlier test left installed
    try:
        with StopOnSignal(verbose=False) as stop:
            signal.raise_signal(signal.SIGINT)  # to this thread: handled before the next line
            assert stop.received == signal.SIGINT and stop.name == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    finally:
        signal.signal(signal.SIGINT, ambient)


def test_cli_turns_a_second_ctrl_c_into_a_clear_exit(monkeypatch, capsys):
    import train.__main__ as cli
    import train.loop

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.loop, "train", interrupted)
    assert cli.main(["--preset=tiny"]) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted twice: exiting at once, without a checkpoint"


def poison_step(monkeypatch, bad_call: int):
    """Make the training forward pass return a NaN loss on its bad_call-th call."""
    original, calls = GPT.forward, [0]

    def forward(self, idx, targets=None, head_weights=None):
        out = original(self, idx, targets, head_weights)
        if targets is not None and head_weights is not None:
            calls[0] += 1
            if calls[0] == bad_call:
                return out[0] * float("nan"), out[1]
        return out
    monkeypatch.setattr(GPT, "forward", forward)


def test_nonfinite_loss_stops_with_step_quantity_and_last_good_checkpoint(monkeypatch, small_corpus, tmp_path):
    poison_step(monkeypatch, 7)
    cfg = tiny_config(small_corpus, tmp_path / "run", train__ckpt_interval=5)
    with pytest.raises(TrainingError) as e:
        train(Args(cfg, "tiny"))
    ckpt = tmp_path / "run" / "ckpt.pt"
    assert str(e.value) == ("non-finite values: train loss is nan at step 7; stopped before updating the weights; "
                            f"last good checkpoint: {ckpt} (step 5)")
    assert read_metrics(tmp_path / "run")[-1] == {"event": "nonfinite", "step": 7,
                                                  "what": "train loss is nan at step 7"}
    assert torch.load(ckpt, weights_only=True)["step"] == 5


def test_skip_nonfinite_skips_and_counts(monkeypatch, small_corpus, tmp_path):
    poison_step(monkeypatch, 7)
    cfg = tiny_config(small_corpus, tmp_path / "run", train__skip_nonfinite="true")
    final = train(Args(cfg, "tiny"))
    assert final["step"] == 30 and final["skipped_steps"] == 1 and math.isfinite(final["full_val_bpc"])
    steps = [r for r in read_metrics(tmp_path / "run") if "event" not in r]
    assert [r.get("skipped_steps", 0) for r in steps if r["step"] in (6, 7, 8)] == [0, 1, 1]
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_nonfinite_loss_between_log_steps_is_named_when_read(monkeypatch, small_corpus, tmp_path):
    """The flag stays on the device between synchronisation points: a NaN at step 7 is read at step 10 (the next
    log and checkpoint step), named with its own step, and the checkpoint of step 10 is never written."""
    poison_step(monkeypatch, 7)
    cfg = tiny_config(small_corpus, tmp_path / "run", train__log_interval=5, train__ckpt_interval=5,
                      train__eval_interval=0)
    with pytest.raises(TrainingError) as e:
        train(Args(cfg, "tiny"))
    ckpt = tmp_path / "run" / "ckpt.pt"
    assert str(e.value) == ("non-finite values: train loss is nan at step 7; read at step 10, after the weights were "
                            f"updated; last good checkpoint: {ckpt} (step 5)")
    assert read_metrics(tmp_path / "run")[-1] == {"event": "nonfinite", "step": 7,
                                                  "what": "train loss is nan at step 7"}
    assert torch.load(ckpt, weights_only=True)["step"] == 5


def test_the_device_flag_keeps_the_first_bad_step_and_names_its_quantity():
    """A finite loss with an infinite gradient norm is named as the norm; a later bad step does not overwrite the
    first one; reading clears the flag; no norm (not computed on this step) counts as finite."""
    flag = NonFiniteFlag(torch.device("cpu"))
    flag.update(1, torch.tensor(2.5), torch.tensor(1.0))
    flag.update(2, torch.tensor(2.4), None)
    assert flag.read() is None
    flag.update(3, torch.tensor(2.3), torch.tensor(float("inf")))
    flag.update(4, torch.tensor(float("nan")), torch.tensor(1.0))
    assert flag.read() == (3, "gradient norm is inf at step 3")
    assert flag.read() is None
    flag.update(5, torch.tensor(float("-inf")), None)
    assert flag.read() == (5, "train loss is -inf at step 5")

"""python -m train.plot renders learning curves of several runs into one image: what its panels hold."""
import json

import pytest

from conftest import run_cli


def fake_run(path, offset):
    path.mkdir()
    rows = [{"event": "start", "step": 0}]
    rows += [{"step": s, "train_loss": 4.0 - s / 100 + offset, "lr": 1e-3, "tokens_per_s": 1e4,
              "train_time_s": s / 10, **({"val_bpc": 5.0 - s / 80 + offset} if s % 50 == 0 else {})}
             for s in range(10, 201, 10)]
    rows.append({"event": "end", "step": 200, "train_time_s": 20.0, "full_val_bpc": 2.6 + offset})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_plot_writes_a_png_of_several_runs(tmp_path):
    import matplotlib.image
    fake_run(tmp_path / "a", 0.0)
    fake_run(tmp_path / "b", 0.3)
    out = tmp_path / "curves.png"
    r = run_cli(str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), module="train.plot")
    assert r.returncode == 0, r.stderr
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_of_a_folder_without_metrics_is_an_error(tmp_path):
    r = run_cli(str(tmp_path), module="train.plot")
    assert r.returncode == 2 and r.stderr.startswith("error: no metrics.jsonl in")


def test_the_curves_are_drawn_in_bits_against_steps_and_seconds(tmp_path, monkeypatch):
    """What the panels hold, read off the figure: train loss converted from nats to bits, validation bpc as logged
    (the whole-split value from the end event as its own marker), steps on the left and seconds on the right, and
    for a run with several heads the final and the intermediate heads' losses in bits, labelled by head."""
    import math

    import matplotlib.pyplot as plt

    from train import plot as plot_mod
    path = tmp_path / "heads"
    path.mkdir()
    rows = [{"event": "start", "step": 0}]
    rows += [{"step": s, "train_time_s": s / 4, "train_loss": 2.0 * s, "loss/final/t+1": 2.0 * s,
              "loss/final/t+2": 3.0 * s, "loss/L1/t+1": 4.0 * s, "loss/L2/t+1": 5.0 * s,
              **({"val_bpc": 1.5 * s} if s % 2 == 0 else {})} for s in (1, 2, 3, 4)]
    rows.append({"event": "end", "step": 4, "train_time_s": 1.0, "full_val_bpc": 2.25})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_mod.plot([plot_mod.load_run(path)], tmp_path / "curves.png")
    train_steps, train_time, val_steps, val_time, final, intermediate = figures[0].axes

    def bits(per_step):
        return pytest.approx([per_step * s / math.log(2) for s in (1, 2, 3, 4)], rel=1e-12)

    def xy(line):
        return [list(line.get_xdata()), list(line.get_ydata())]
    for ax, x in ((train_steps, [1, 2, 3, 4]), (train_time, [0.25, 0.5, 0.75, 1.0])):
        assert xy(ax.lines[0]) == [x, bits(2.0)]
    for ax, x, end in ((val_steps, [2, 4], 4), (val_time, [0.5, 1.0], 1.0)):
        assert xy(ax.lines[0]) == [x, [3.0, 6.0]] and xy(ax.lines[1]) == [[end], [2.25]]
    drawn = {line.get_label(): list(line.get_ydata()) for ax in (final, intermediate) for line in ax.lines}
    assert drawn == {"heads final/t+1": bits(2.0), "heads final/t+2": bits(3.0), "L1/t+1": bits(4.0),
                     "L2/t+1": bits(5.0)}
    assert intermediate.lines[0].get_color() != intermediate.lines[1].get_color()  # one colour per layer


def test_a_training_run_ends_with_its_curves_in_its_folder(small_corpus, tmp_path, capsys):
    """log.plot=true (the default outside the tiny preset): the run folder gets curves.png and the summary lists
    it; log.plot=false says that it was not written."""
    import matplotlib.image

    from conftest import tiny_config
    from train.config import Args
    from train.loop import train
    for plot in ("true", "false"):
        out = tmp_path / f"run-{plot}"
        train(Args(tiny_config(small_corpus, out, log__plot=plot, train__max_steps="12", train__final_eval="false"),
                   "tiny"))
        printed = capsys.readouterr().out
        assert (out / "curves.png").exists() == (plot == "true")
        assert ("ckpt.pt, curves.png)" in printed) == (plot == "true")
        assert ("no curves.png (log.plot=false)" in printed) == (plot == "false")
    image = matplotlib.image.imread(tmp_path / "run-true" / "curves.png")
    assert image.shape[0] > 500 and image[..., :3].std() > 0.05


def test_the_run_curves_never_fail_a_finished_run(tmp_path, monkeypatch):
    """Without matplotlib, or with metrics the plot cannot read, write_run_curves returns a line saying why; a last
    line torn by a crash is left out (what a killed run leaves)."""
    import sys

    from train.plot import write_run_curves
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n{"step": 2, "train_loss": 4.0}\n{"torn')
    assert write_run_curves(tmp_path) is None and (tmp_path / "curves.png").stat().st_size > 1000
    (tmp_path / "curves.png").unlink()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": "five"}\n')
    assert write_run_curves(tmp_path).startswith("warning: curves.png not written (TypeError")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert write_run_curves(tmp_path) == "no curves.png: plotting needs matplotlib (pip install matplotlib)"
    assert not (tmp_path / "curves.png").exists()

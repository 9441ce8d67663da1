"""python -m train.plot renders learning curves of several runs into one image."""
import json

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

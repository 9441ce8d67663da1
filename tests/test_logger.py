"""Progress bars off a terminal: one plain line at most every PLAIN_INTERVAL_S seconds (and the last one at the
end), whatever redraws tqdm's monitor thread would force; the training bar's text in bits per byte; the end-of-run
summary."""
import math
import sys
import time

import tqdm as tqdm_module

from train import logger
from train.config import LogConfig


class TimedStream:
    """A non-terminal stderr that records when each line arrives."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []

    def write(self, s: str) -> None:
        self.lines.extend((time.monotonic(), line) for line in s.splitlines() if line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_plain_lines_come_no_closer_than_the_interval(monkeypatch):
    stream = TimedStream()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(logger, "PLAIN_INTERVAL_S", 1.0)
    monkeypatch.setattr(tqdm_module.tqdm, "monitor_interval", 0.05)  # the monitor wakes often
    # a caller's short maxinterval: where tqdm's monitor would redraw a slow bar (its default, 10 s, is below 30 s)
    bar = logger.progress_bar(total=350, mininterval=0.01, maxinterval=0.2)
    start = time.monotonic()
    for _ in range(350):
        time.sleep(0.01)
        bar.update(1)
    bar.close()
    elapsed = time.monotonic() - start
    times = [t for t, _ in stream.lines]
    gaps = [b - a for a, b in zip(times[:-1], times[1:-1])]  # the closing line may follow the last one at once
    assert all("\r" not in line for _, line in stream.lines)
    assert stream.lines[-1][1].startswith("100%")
    assert len(stream.lines) <= elapsed / 1.0 + 2, [round(t - start, 2) for t in times]
    assert all(gap >= 0.95 for gap in gaps), gaps


def test_a_bar_that_leaves_nothing_on_a_terminal_still_ends_with_its_last_line_in_a_log(monkeypatch):
    """The evaluator's bars (leave=False) used to vanish from a log at their last interval line (82%)."""
    stream = TimedStream()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = logger.progress_bar(total=7, desc="eval", leave=False)
    for _ in range(7):
        bar.update(1)
    bar.close()
    assert stream.lines and stream.lines[-1][1].startswith("eval: 100%") and "7/7" in stream.lines[-1][1]


def test_the_training_bar_shows_the_train_loss_in_bits_beside_the_validation_bpc():
    """train_loss is logged in nats; the bar converts it, so train and validation read on one scale."""
    text = logger.bar_postfix({"step": 30, "train_loss": 2 * math.log(2), "val_bpc": 2.5, "lr": 1e-3})
    assert text == "step 30, train_bpc 2, val_bpc 2.5"
    assert logger.bar_postfix({"step": 1, "train_loss": math.log(256)}) == "step 1, train_bpc 8"
    assert logger.bar_postfix({}) == ""


def test_the_end_of_run_summary_names_the_curves_only_when_they_were_drawn(tmp_path):
    interrupted = {"event": "interrupted", "signal": "SIGTERM", "step": 5}
    assert f", curves in {tmp_path / 'curves.png'}\n" in logger.summary(tmp_path, interrupted, {"name": "enwik8"})
    assert "curves" not in logger.summary(tmp_path, interrupted, {"name": "enwik8"}, "no curves.png (log.plot=false)")
    end = {"event": "end", "step": 9, "train_time_s": 2.0}
    drawn = logger.summary(tmp_path, end, {"name": "sample"}).splitlines()
    assert drawn[2] == f"run folder: {tmp_path}  (config.json, metrics.jsonl, ckpt.pt, curves.png)"
    missing = logger.summary(tmp_path, end, {"name": "sample"}, "no curves.png: plotting needs matplotlib").splitlines()
    assert missing[2:4] == [f"run folder: {tmp_path}  (config.json, metrics.jsonl, ckpt.pt)",
                            "  no curves.png: plotting needs matplotlib"]


def test_a_resume_drops_the_lines_after_its_checkpoint_and_a_torn_last_line(tmp_path):
    """A run killed after its checkpoint at step 20 logged steps 30 and 40 and tore the line of step 50: the resumed
    run keeps the events and steps up to 20, then appends; a log with nothing to drop is left as it is."""
    path = tmp_path / "metrics.jsonl"
    kept = ['{"event": "start", "config": {}}', '{"step": 10, "train_loss": 3.0}', '{"step": 20, "val_bpc": 2.5}']
    path.write_text("\n".join(kept + ['{"step": 30, "train_loss": 2.0}', '{"step": 40, "train_loss": 1.9}',
                                      '{"step": 50, "train_lo']))
    log = logger.MetricsLog(tmp_path, LogConfig(), enabled=True, run_config={}, resume_step=20)
    log.write({"step": 21, "train_loss": 2.4})
    log.close()
    assert path.read_text() == "\n".join(kept + ['{"step": 21, "train_loss": 2.4}']) + "\n"
    before = path.stat().st_mtime_ns
    assert logger.truncate_after(path, 21) == 0 and path.stat().st_mtime_ns == before
    assert logger.truncate_after(tmp_path / "missing.jsonl", 5) == 0
    logger.MetricsLog(tmp_path / "off", LogConfig(), enabled=False, run_config={}, resume_step=None).write({"step": 1})
    assert not (tmp_path / "off").exists()  # ranks other than the main one write nothing

"""The training step reads nothing back from the device between synchronisation points (log, evaluation and
checkpoint steps): every read of a floating-point tensor's value by charlm's own code (`Tensor.item`, `float()`,
`.tolist()`, `.cpu()`) is counted, by step, during a short CPU run. On a GPU each such read would make the host wait
for the device."""
import sys
import threading
from pathlib import Path

import torch

from conftest import REPO, tiny_config
from train.config import Args
from train.loop import Run, train

OWN_CODE = tuple(str(REPO / d) for d in ("train", "model", "kernels"))


def test_no_value_reads_between_synchronisation_points(monkeypatch, small_corpus, tmp_path):
    reads, current, seen = [], {}, []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if (current.get("sync") is False and self.is_floating_point() and caller.startswith(OWN_CODE)
                    and threading.current_thread() is threading.main_thread()):
                reads.append((current["step"], name, f"{Path(caller).name}:{sys._getframe(1).f_lineno}"))
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "__float__", "tolist", "cpu"):
        counting(name)
    step = Run.train_step

    def observed(self, stop):
        current.update(step=self.step + 1, sync=self.sync_due(self.step + 1))
        seen.append((current["step"], current["sync"]))
        try:
            return step(self, stop)
        finally:
            current.clear()
    monkeypatch.setattr(Run, "train_step", observed)
    cfg = tiny_config(small_corpus, tmp_path / "run", train__log_interval=4, train__eval_interval=8,
                      train__ckpt_interval=12, train__max_steps=20, model__intermediate_loss="true",
                      model__n_targets=2, model__target_weights="1.0,0.5")
    train(Args(cfg, "tiny"))
    assert reads == []
    assert [s for s, sync in seen if sync] == [4, 8, 12, 16, 20] and len(seen) == 20  # 15 steps were watched

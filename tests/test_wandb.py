"""log.wandb=true: Weights & Biases logging, offline here; a clear error without the package."""
import sys

import pytest

from conftest import run_cli
from train.config import ConfigError, parse_args


def test_wandb_offline_run_is_recorded(small_corpus, tmp_path):
    out = tmp_path / "run"
    r = run_cli("--preset=tiny", f"--data.source={small_corpus}", f"--out_dir={out}", "--log.wandb=true",
                "--log.wandb_name=offline-test", "--train.max_steps=6",
                env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_wandb_flag_without_the_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"log.wandb=true needs the wandb package: pip install -e '.\[wandb\]'"):
        parse_args(["--preset=tiny", "--log.wandb=true"])
    assert parse_args(["--preset=tiny"]).cfg.log.wandb is False  # off by default: no wandb needed

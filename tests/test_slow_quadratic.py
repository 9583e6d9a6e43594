"""Full-size reproduction of the quadratic experiment (``make test-slow``; about 3 minutes on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_l2l.cli import run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "meta.yaml"


@pytest.mark.slow
def test_meta_yaml_beats_tuned_baselines_on_held_out_quadratics(tmp_path, monkeypatch):
    """Issue bar: at most 0.7x the best tuned baseline's mean loss at step 100 on 256 held-out quadratics."""
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(CONFIG), "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    run(["fit", *common])
    cli = run(["test", *common, "--ckpt_path", "best"])
    c = cli.model.comparison
    assert c.num_problems == 256 and c.num_steps == 100
    assert c.ratio() <= 0.7, c.table()

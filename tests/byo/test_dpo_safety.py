"""DPO's safe defaults: a per-method, full/adapter learning rate when train.lr is not given, and
warnings (log + summary + report) when the run's own signals say the model is degrading."""

from __future__ import annotations

import pytest

from lmforge.train.dpo import DEFAULT_LR, Config
from lmforge.train.health import degradation_warnings

from ..test_report import fake_stage


@pytest.mark.parametrize("method", sorted(DEFAULT_LR))
def test_lr_default_depends_on_method_and_adapter_and_yields_to_the_user(method):
    full, lora = DEFAULT_LR[method]
    assert Config(method=method).train.lr == full
    assert Config(method=method, adapter={"method": "lora"}).train.lr == lora
    assert Config(method=method, train={"lr": 1e-4}).train.lr == 1e-4  # what the user set stays
    assert full <= 5e-6 and lora <= 5e-6  # never the shared 1e-3 that ruined every model tried
    again = Config.model_validate(Config(method=method, adapter={"method": "lora"}).model_dump())
    assert again.train.lr == lora  # a saved config reloads to the same rate


def recs(key: str, values: list[float]) -> list[dict]:
    return [{"step": i + 1, key: v} for i, v in enumerate(values)]


def test_no_warning_for_a_healthy_run():
    healthy = [{"step": i, "logp_chosen": -20.0 + 0.1 * i, "reward_chosen": 0.01 * i} for i in range(1, 9)]
    healthy += [{"step": 0, "probe_chosen": 0.5}, {"step": 8, "probe_chosen": 0.5}]
    assert degradation_warnings(healthy, lr=5e-7) == []


def test_chosen_logprob_falling_more_than_a_nat_warns():
    # first quarter mean (-20 - 20.5)/2 = -20.25, last quarter (-21.5 - 22)/2 = -21.75: fell 1.5 nats
    ws = degradation_warnings(recs("logp_chosen", [-20, -20.5, -20.8, -21, -21.2, -21.3, -21.5, -22]), lr=1e-3)
    assert ws == ["the chosen responses' log-probability fell from -20.25 to -21.75; the model may be degrading: "
                  "lower train.lr (now 0.001) or train fewer steps, and evaluate it."]
    # a fall of 0.75 nats is within batch noise: no warning
    assert degradation_warnings(recs("logp_chosen", [-20, -20, -20.5, -20.5, -20.6, -20.7, -20.75, -20.75]),
                                lr=1e-3) == []


def test_negative_chosen_reward_warns_only_when_the_last_quarter_is_negative():
    ws = degradation_warnings(recs("reward_chosen", [0.1, 0.05, 0.0, -0.02, -0.05, -0.1, -0.2, -0.3]), lr=1e-3)
    assert len(ws) == 1 and "the chosen reward is negative (-0.250 over the last quarter" in ws[0]
    assert degradation_warnings(recs("reward_chosen", [-0.1, -0.05, 0.0, 0.02, 0.05, 0.1, 0.2, 0.3]), lr=1e-3) == []


def test_probe_match_rate_below_its_start_warns():
    ws = degradation_warnings(recs("probe_chosen", [0.75, 0.8, 0.25]), lr=1e-3)
    assert len(ws) == 1 and "less often than at the start (75% -> 25%)" in ws[0]
    assert degradation_warnings(recs("probe_chosen", [0.75, 0.5, 0.75]), lr=1e-3) == []


def test_report_lists_a_stage_warnings(tmp_path):
    from lmforge.report import build_report

    root = tmp_path / "run"
    fake_stage(root, "dpo", "dpo", "model", wall=2.0, finished="2024-01-01T00:00:01",
               summary={"warnings": ["the chosen reward is negative (-0.250 over the last quarter of steps)"]},
               metrics=[{"step": 1, "loss": 0.6}])
    build_report(root)
    md = (root / "report.md").read_text()
    assert "## Warnings" in md and "| dpo | the chosen reward is negative (-0.250 over the last quarter of steps) |" in md

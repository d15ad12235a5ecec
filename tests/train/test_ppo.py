"""The `ppo` stage: per-token rewards and the adaptive KL controller against hand values, the rollout
tensors, a first update whose ratio is exactly 1, a tiny run that learns a rule reward with
bounded KL, bad input, and resume after SIGKILL from the last completed rollout step."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import losses as L
from lmforge.errors import LmforgeError
from lmforge.pipeline import run_single
from lmforge.rundir import RunDir, read_manifest
from lmforge.train import checkpoint as ckpt
from lmforge.train.ppo import Config, adaptive_kl_coef, ppo_micro_loss, token_rewards
from lmforge.train.rollout import score_pass, setup

from .conftest import assert_bitwise_equal, run_cli, start_stage, write_yaml


def write_prompts(path: Path, n: int = 64, words: int = 1) -> Path:
    rows = [{"prompt": " ".join([f"Tell me about item {i}."] * words), "answer": str(i % 10)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("rl") / "prompts.jsonl")


def ppo_config(model, prompts, **over) -> dict:
    """The toy task: the random tiny model writes the word "is" in ~20% of its 8-token answers;
    the reward is 1 for an answer containing it (lmforge.rewards' `contains` rule)."""
    train = dict(max_steps=12, batch_size=16, lr=2e-4, threads=1, tensorboard=False, checkpoint_every=0, seed=1,
                 log_every=1)
    train.update(over.pop("train", {}))
    return {"model": str(model), "prompts": str(prompts), "rewards": [{"kind": "contains", "word": "is"}],
            "prompts_per_step": 16, "epochs": 2, "rollout": {"temperature": 1.0, "max_new_tokens": 8},
            "sample_every": 0, "train": train, **over}


def metrics(run: Path) -> list[dict]:
    return [m for m in RunDir(run, "ppo", "model").read_metrics() if "reward" in m]


# ---------------------------------------------------------------- pure pieces, by hand


def test_token_rewards_put_the_score_on_the_last_token_and_penalise_kl():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([1.0, -0.5]), logp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref: [0.5, -1.0, 0] and [1.0, 0, (masked)]; r = -0.1 k1, + score on the last real token
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 1.0], [-0.1, -0.5, 0.0]]))
    _, kl3 = token_rewards(torch.tensor([0.0, 0.0]), logp, ref, mask, kl_coef=0.1, estimator="k3")
    # k3(d) = exp(-d) - 1 + d: d = 0.5 -> 0.1065307, d = -1 -> e - 2 = 0.7182818
    assert torch.allclose(kl3[0], torch.tensor([0.1065307, 0.7182818, 0.0]), atol=1e-6)


def test_adaptive_kl_coefficient_hand_values():
    # Ziegler et al.: error = clip(kl / target - 1, -0.2, 0.2); coef *= 1 + error * n / horizon
    assert adaptive_kl_coef(0.1, 12.0, target=6.0, horizon=640, n=64) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, 5.4, target=6.0, horizon=640, n=64) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert adaptive_kl_coef(0.1, 0.0, target=6.0, horizon=100, n=100) == pytest.approx(0.08)


def test_micro_loss_is_token_sum_of_the_clipped_losses():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.2]])  # ratios 1 and e^0.2 = 1.2214 (clipped at 1.2 for a positive advantage)
    adv = torch.tensor([[1.0, 1.0]])
    values, old_v, ret = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    out = ppo_micro_loss(logp, old, values, old_v, adv, ret, mask, clip=0.2, value_clip=0.2, vf_coef=0.5)
    pg = -(1.0 + 1.2) / 2  # max(-A r, -A clip(r)) per token: -1 and -1.2
    vf = 0.5 * ((0.64 + 1.0) / 2)  # token 1: V clipped to 0 + 0.2: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 2: 1
    assert out.loss.item() == pytest.approx(2 * (pg + 0.5 * vf))
    assert out.stats["clipped"].item() == pytest.approx(1.0)  # clip fraction 1/2 x 2 tokens
    assert out.ratio_dev.item() == pytest.approx(0.2214028, abs=1e-6)


def test_a_partial_train_section_keeps_the_rl_defaults():
    t = Config(train={"max_steps": 3}).train  # not the pre-training defaults (lr 1e-3, cosine, warmup 10)
    assert (t.max_steps, t.lr, t.schedule, t.warmup_steps, t.weight_decay) == (3, 1e-5, "constant", 0, 0.0)
    with pytest.raises(ValueError, match="early_stopping_patience needs a validation loss"):
        Config(train={"early_stopping_patience": 2})
    with pytest.raises(ValueError, match="prefix tuning adds key/value positions"):
        Config(adapter={"method": "prefix"})


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
@pytest.mark.parametrize("field,value,expect", [
    ("compile", True, "train.compile is refused by the RL stages: every rollout has new shapes"),
    ("fsdp", True, "train.fsdp is refused by the RL stages: each process samples with the whole policy"),
    ("eval_every", 10, "train.eval_every needs a validation loss, which RL stages do not have"),
    ("eval_batches", 5, "train.eval_batches needs a validation loss"),
    ("keep_best", True, "train.keep_best needs a validation loss"),
])
def test_fields_the_rl_stages_cannot_honour_are_refused_in_one_sentence(tmp_path, stage, field, value, expect):
    """Not silently ignored: the CLI names the field and exits 2 before any work."""
    cfg = write_yaml(tmp_path / "c.yaml", {"model": str(tmp_path), "prompts": str(tmp_path / "p.jsonl"),
                                           "train": {field: value}})
    r = run_cli(stage, str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    t = Config(train={"eval_every": 0, "keep_best": False}).train  # the values that mean "no evaluation" pass
    assert (t.eval_every, t.keep_best, t.compile, t.fsdp) == (0, False, False, False)


# ---------------------------------------------------------------- rollouts and the first ratio


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_rollout_tensors_and_the_first_update_ratio_is_exactly_one(tmp_path, tiny_model_dir, prompts, adapter):
    cfg = Config(**ppo_config(tiny_model_dir, prompts, adapter={"method": adapter, "r": 4}, missing_eos_penalty=0.5,
                              rollout={"temperature": 0.7, "max_new_tokens": 6}, train=dict(batch_size=4)))
    s = setup(cfg, RunDir(tmp_path / "run", "ppo", "model"), False, stage="ppo", group=1, value_head=True,
              reference=True)
    ro = s.rollout()
    tok, P = s.tokenizer, ro.n_prompt
    assert len(ro) == 16
    for i in range(len(ro)):
        n = int(ro.mask[i].sum())
        assert n == ro.resp_lens[i] and ro.mask[i, n:].sum() == 0
        prompt = s.prompts.ids[ro.prompt_index[i]]
        assert ro.input_ids[i, P - len(prompt):P].tolist() == prompt  # left-padded prompt ends at column P
        assert int(ro.attention_mask[i].sum()) == len(prompt) + n
        resp = ro.input_ids[i, P:P + n].tolist()
        assert bool(ro.finished[i]) == (resp[-1] == tok.eos_token_id)
        assert tok.decode(resp[:-1] if ro.finished[i] else resp, skip_special_tokens=True) == ro.texts[i]
    # the reward: 1 for "is", minus the missing-EOS penalty for a response cut at max_new_tokens
    assert torch.equal(ro.scores, torch.tensor(ro.parts["contains"], dtype=torch.float32) - 0.5 * (~ro.finished).float())

    chunks = [c for step in s.micro_batches(torch.arange(len(ro))) for c in step]  # the first pass's
    score_pass(s.net, s.ref, ro, chunks, temperature=0.7, autocast=s.t.acc.autocast)
    # the scoring forward uses the sampling distribution: it agrees with the sampler's own log-probs...
    assert torch.allclose(ro.old_logp, ro.sampler_logp, atol=1e-4)
    # ...which a forward at another temperature would not
    assert (ro.old_logp - ro.sampler_logp).abs().max() < 1e-3 < (L.token_logprobs(
        s.net(ro.input_ids, ro.attention_mask, P)[0], ro.response, temperature=1.0) * ro.mask - ro.old_logp).abs().max()
    # the reference is the starting policy: KL 0 before any update (the adapter disabled / the frozen copy)
    assert torch.equal(ro.ref_logp, ro.old_logp)

    # the first micro-batch of the update, exactly as the stage runs it, with gradients
    mb = ro.micro(chunks[0], old_logp=ro.old_logp)
    logits, values = s.net(mb["input_ids"], mb["attention_mask"], mb["n_prompt"])
    logp = L.token_logprobs(logits, mb["labels"], temperature=0.7) * mb["mask"]
    assert logp.requires_grad and torch.equal(logp, mb["old_logp"])
    ratio = torch.exp(logp - mb["old_logp"])
    assert torch.equal(ratio, torch.ones_like(ratio))
    assert torch.equal(values, torch.zeros_like(values))  # the value head starts at 0


# ---------------------------------------------------------------- the toy task learns


# The first three rollout steps of the tiny run below (ppo_config, seed 1, the conftest tiny model),
# recorded on torch 2.13 CPU by running it and reading metrics.jsonl; the same figures before and
# after the RL stages moved onto the shared Trainer. A change to sampling, rewards, the score pass,
# GAE, the loss, the update order or the optimizer step moves them.
PINNED = {"reward": [0.1875, 0.625, 0.9375],
          "policy_loss": [-0.039996080100536346, -0.04957502335309982, -0.02552659437060356],
          "value_loss": [0.06673778593540192, 0.18244117498397827, 0.2683362364768982],
          "kl": [0.0, 2.914449453353882, 4.192625522613525],
          "grad_norm": [8.565502166748047, 10.53640079498291, 8.517780303955078]}


def test_tiny_ppo_run_raises_the_reward_with_bounded_kl(tmp_path, tiny_model_dir, prompts):
    m = run_single("ppo", str(write_yaml(tmp_path / "c.yaml", ppo_config(tiny_model_dir, prompts))), [],
                   out=str(tmp_path / "run"), force=True, resume=False, echo=lambda *a: None)
    ms = metrics(tmp_path / "run")
    for k, want in PINNED.items():
        assert [x[k] for x in ms[:3]] == pytest.approx(want, rel=1e-4, abs=1e-6), k
    assert [x["step"] for x in ms] == list(range(1, 13))
    first, last = ms[0]["reward"], sum(x["reward"] for x in ms[-4:]) / 4
    assert first < 0.4 and last > 0.75, (first, last)  # ~0.2 -> ~0.9 on this seed
    assert ms[0]["kl"] == 0.0 and max(x["kl"] for x in ms) < 12.0  # nats per 8-token response (seeds 1-5: <= 8.6)
    assert all(x["ratio_dev_first"] == 0.0 for x in ms)  # every rollout's first update starts at ratio 1
    assert all(x["sampler_logp_gap"] < 1e-4 for x in ms)
    assert m["summary"]["reward_last"] == ms[-1]["reward"]
    out = tmp_path / "run" / "model"
    assert (out / "model.safetensors").is_file() and set(load_file(str(out / "value_head.safetensors"))) == {
        "weight", "bias"}


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_sentence_or_a_counted_skip(tmp_path, tiny_model_dir, prompts):
    def run(cfg: dict, name: str, resume: bool = False) -> dict:
        return run_single("ppo", str(write_yaml(tmp_path / f"{name}.yaml", cfg)), [], out=str(tmp_path / name),
                          force=not resume, resume=resume, echo=lambda *a: None)

    with pytest.raises(LmforgeError, match="score_fn 'no_such_mod:f': module 'no_such_mod' cannot be imported"):
        run(ppo_config(tiny_model_dir, prompts, rewards=[{"kind": "function", "function": "no_such_mod:f"}]), "a")
    # prompts too long for the context (128 tokens) with max_new_tokens are counted and skipped
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(prompts.read_text() + write_prompts(tmp_path / "long.jsonl", 3, words=30).read_text())
    m = run(ppo_config(tiny_model_dir, mixed, train=dict(max_steps=1)), "b")
    assert m["summary"]["prompts"] == 64 and m["summary"]["prompts_skipped_too_long"] == 3
    with pytest.raises(LmforgeError, match="No prompt of .*long.jsonl fits the model's context of 128 tokens"):
        run(ppo_config(tiny_model_dir, tmp_path / "long.jsonl"), "c")
    with pytest.raises(LmforgeError, match="batch_size x train.grad_accum = 5 does not divide"):
        run(ppo_config(tiny_model_dir, prompts, train=dict(batch_size=5)), "d")

    # a reward function that fails mid-run: the completed steps are checkpointed, then one sentence
    rule = tmp_path / "rule.py"
    rule.write_text("calls = 0\ndef f(prompt, response, row):\n    global calls\n    calls += 1\n"
                    "    return 'oops' if calls > 32 else 1.0\n")
    cfg = ppo_config(tiny_model_dir, prompts, rewards=[{"kind": "function", "function": f"{rule}:f"}],
                     train=dict(max_steps=4, checkpoint_every=10))
    with pytest.raises(LmforgeError, match=r"returned 'oops' for .* \(step 3\).* The 2 completed steps are saved in "
                       r".*; fix it and re-run with --resume"):
        run(cfg, "e")
    assert ckpt.latest(tmp_path / "e" / "checkpoints").name == "step-000002"
    rule.write_text("def f(prompt, response, row):\n    return 1.0\n")
    run(cfg, "e", resume=True)
    assert [x["step"] for x in metrics(tmp_path / "e")] == [1, 2, 3, 4]


# ---------------------------------------------------------------- resume after SIGKILL / SIGTERM


def interrupt_and_resume(stage: str, cfg: Path, tmp_path: Path, sig: int, files: tuple[str, ...]) -> None:
    """Run `stage` uninterrupted, then again killed with `sig` after step 3 (SIGKILL: after its
    step-3 checkpoint; SIGTERM saves one at the next step boundary) and resumed: the final weights must be bitwise those of the uninterrupted run, and every step is
    logged once. Shared by the ppo and grpo tests."""
    r = run_cli(stage, str(cfg), "--out", str(tmp_path / "ref"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed"
    proc = start_stage(stage, cfg, out)
    t0 = time.time()
    metrics_file = out / "metrics.jsonl"
    while not ((out / "checkpoints" / "step-000003").exists() if sig == signal.SIGKILL else
               metrics_file.exists() and metrics_file.read_text().count("\n") >= 3):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 120
        time.sleep(0.005)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    if sig == signal.SIGKILL:
        assert rc == -9
    else:  # the shared Trainer: a checkpoint at the next step boundary, then exit 143
        assert rc == 143 and "saved a checkpoint at step" in stderr and "Traceback" not in stderr, stderr
    assert read_manifest(out)["status"] == "running"
    killed_at = ckpt.latest(out / "checkpoints")
    assert killed_at is not None and 3 <= int(killed_at.name[5:]) < 8
    r = run_cli(stage, str(cfg), "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resumed from checkpoint {killed_at}" in r.stdout
    for f in files:
        assert_bitwise_equal(load_file(str(tmp_path / "ref" / "model" / f)), load_file(str(out / "model" / f)))
    got = [m for m in RunDir(out, stage, "model").read_metrics() if "reward" in m]
    assert [x["step"] for x in got] == list(range(1, 9))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_ppo_resumes_from_the_last_rollout_step_bitwise(tmp_path, tiny_model_dir, prompts, sig):
    cfg = write_yaml(tmp_path / "c.yaml", ppo_config(tiny_model_dir, prompts, kl_target=2.0, train=dict(
        max_steps=8, checkpoint_every=1 if sig == signal.SIGKILL else 0)))
    interrupt_and_resume("ppo", cfg, tmp_path, sig, ("model.safetensors", "value_head.safetensors"))
    ref, got = metrics(tmp_path / "ref"), metrics(tmp_path / "killed")
    # the adaptive KL coefficient is part of the checkpointed state
    assert [x["kl_coef"] for x in got] == [x["kl_coef"] for x in ref] and got[-1]["kl_coef"] != 0.05


# ---------------------------------------------------------------- 2 processes = 1 process


def test_two_processes_match_one_process(tmp_path, tiny_model_dir, prompts):
    """torchrun, 2 CPU processes (gloo), batch 4 x accumulation 2 each == 1 process, batch 8 x 2:
    each process samples half the prompts (with the single process's random streams) and trains
    on its share of every optimizer step; 2 epochs, so the second pass mixes both processes' rows."""
    from .test_loop import torchrun

    base = ppo_config(tiny_model_dir, prompts, kl_target=2.0, train=dict(max_steps=3, grad_accum=2))
    one = write_yaml(tmp_path / "one.yaml", {**base, "train": {**base["train"], "batch_size": 8}})
    two = write_yaml(tmp_path / "two.yaml", {**base, "train": {**base["train"], "batch_size": 4}})
    r = run_cli("ppo", str(one), "--out", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    r = torchrun("ppo", str(two), "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout
    for f in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(tmp_path / "one" / "model" / f)), load_file(str(tmp_path / "two" / "model" / f))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a), f
    ma, mb = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [x["reward"] for x in ma] == [x["reward"] for x in mb]  # the same responses were sampled
    for k in ("policy_loss", "value_loss", "kl", "kl_coef", "entropy", "grad_norm"):
        assert [x[k] for x in ma] == pytest.approx([x[k] for x in mb], rel=1e-4, abs=1e-6), k
    assert ma[-1]["kl"] > 0  # the policy moved: the comparison can fail

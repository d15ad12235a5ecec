"""The `dpo` stage: log-probs of packed batches, the method table, equivalence with TRL's
DPOTrainer, a tiny run that moves greedy behaviour, the "accuracy up, behaviour unchanged" trap
made visible, LoRA with the base as reference, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge import losses as L
from lmforge.data.preference import PreferenceBatches, collate, model_inputs, read_preferences
from lmforge.data.sft import ChatEncoder
from lmforge.pipeline import run_single
from lmforge.rundir import RunDir
from lmforge.train.dpo import METHODS, NEEDS_REFERENCE, Config, ResponseLogProbs, batch_loss, run_logprobs

from .conftest import assert_bitwise_equal, first_losses, sigkill_after_checkpoint, write_yaml

SUBJ = ["The quick brown fox", "The lazy dog", "The old miller", "A small model", "The northern gate"]
VERB = ["jumps over the hills", "carries three apples", "answers questions", "is fine", "is old"]
QA = [("How are you today?", "I am fine, thank you."), ("What is two plus two?", "Two plus two is four.")]


def qa_rows(n: int, seed: int) -> list[dict]:
    """The right answer depends on the question; the wrong one is the other question's answer."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        k = r.randrange(2)
        rows.append({"prompt": f"{r.choice(SUBJ)} {r.choice(VERB)}. {QA[k][0]}", "chosen": QA[k][1],
                     "rejected": QA[1 - k][1]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    return write_jsonl(d / "train.jsonl", qa_rows(160, 1)), write_jsonl(d / "val.jsonl", qa_rows(32, 2))


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def sft_start(tmp_path_factory, tiny_model_dir, files, tok):
    """The tiny model after a short SFT on BOTH answers of every prompt: it says one of the two
    answers, without knowing which one fits (greedy picks the right one about half the time)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    items = read_preferences(str(files[0]), ChatEncoder(tok), unit="items", max_length=128)["train"]
    batches = PreferenceBatches(items, unit="items", seed=0, pad_id=tok.pad_token_id, layout="pack")
    net = ResponseLogProbs(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        b = batches.batch(step * 16, 16)
        lp, _ = run_logprobs(net, b)
        loss = -lp.sum() / b["n_tokens"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("sft") / "model"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def dpo_config(model, files, **over) -> dict:
    train = dict(max_steps=20, batch_size=8, lr=6e-4, warmup_steps=2, eval_every=10, eval_batches=4,
                 checkpoint_every=0, log_every=1, tensorboard=False, threads=1, seed=5, keep_best=False)
    train.update(over.pop("train", {}))
    return {"model": str(model), "data": str(files[0]), "val_data": str(files[1]), "probe_prompts": 4,
            "train": train, **over}


def run_dpo(tmp: Path, cfg: dict, name: str = "run", resume: bool = False) -> dict:
    path = write_yaml(tmp / f"{name}.yaml", cfg)
    return run_single("dpo", str(path), [], out=str(tmp / name), force=not resume, resume=resume, echo=lambda *a: None)


def evals(run: Path) -> list[dict]:
    return [m for m in RunDir(run, "dpo", "model").read_metrics() if "val_loss" in m]


# ---------------------------------------------------------------- log-probs and the method table


def _naive(model, ids: list[int], p: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    return float(sum(lp[t - 1, ids[t]] for t in range(p, len(ids))))


@pytest.mark.parametrize("adapter", [False, True])
def test_packed_response_logprobs_equal_one_sequence_at_a_time(tmp_path, tiny_model_dir, tok, adapter):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    if adapter:
        from lmforge.adapters import AdapterConfig, apply_adapter

        model = apply_adapter(model, AdapterConfig(method="lora", r=4, dropout=0.0))
        with torch.no_grad():  # a trained-looking adapter (B is zero at init)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    model.eval()
    rows = qa_rows(4, 3) + [{"prompt": "Hello there!", "chosen": "Two.", "rejected": "Four."},
                            {"prompt": "Hi", "chosen": "I am fine.", "rejected": "The lazy dog jumps."}]
    d = read_preferences(str(write_jsonl(tmp_path / "p.jsonl", rows)), ChatEncoder(tok), unit="pairs",
                         max_length=128)["train"]
    seqs = np.concatenate([d.chosen, d.rejected])
    naive = [_naive(model, d.seq(int(s)).tolist(), int(d.prompt_len[s])) for s in seqs]
    net = ResponseLogProbs(model)
    for layout in ("pack", "pad"):
        b = collate(d, seqs, layout=layout, pad_id=tok.pad_token_id)
        if layout == "pack":
            assert b["input_ids"].shape[0] < len(seqs)  # several sequences share rows
        with torch.no_grad():
            lp, hits = net(**model_inputs(b), n_slots=len(seqs), top1=True)
        assert lp.tolist() == pytest.approx(naive, abs=2e-4)
        assert ((hits >= 0) & (hits <= b["n_tokens"])).all()


def _batch(pc, pr, rc, rr, nc, nr) -> tuple[dict, torch.Tensor]:
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return {"n": len(pc), "n_tokens": t(*nc, *nr), "ref_logps": t(*rc, *rr)}, t(*pc, *pr)


def test_method_table_feeds_each_pure_loss_its_arguments():
    assert set(METHODS) == {"dpo", "cdpo", "ipo", "rpo", "simpo", "orpo"}
    assert NEEDS_REFERENCE == {"dpo", "cdpo", "ipo", "rpo", "kto"}
    # pc=-1, pr=-3, rc=rr=-2, beta=0.5: z = 0.5 * ((-1 + 2) - (-3 + 2)) = 1 -> loss -log sigma(1) = 0.31326
    b, lp = _batch([-1.0], [-3.0], [-2.0], [-2.0], [2], [4])
    out = batch_loss(Config(method="dpo", beta=0.5), b, lp)
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))
    assert out.metrics["reward_chosen"].item() == pytest.approx(0.5)
    assert out.metrics["reward_rejected"].item() == pytest.approx(-0.5)
    assert out.metrics["accuracy"].item() == 1 and out.metrics["logp_rejected"].item() == -3
    # IPO on per-token averages: h = (-1/2 + 2/2) - (-3/4 + 2/4) = 0.75; (0.75 - 1/(2*0.5))^2 = 0.0625
    assert batch_loss(Config(method="ipo", beta=0.5), b, lp).loss.item() == pytest.approx(0.0625)
    # RPO adds alpha x chosen mean NLL = 2 x (1 / 2)
    assert batch_loss(Config(method="rpo", beta=0.5, rpo_alpha=2.0), b, lp).loss.item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-1))) + 1.0)
    # SimPO: -log sigma(2 * (-1/2) - 2 * (-3/4) - 0.5) = -log sigma(0) = log 2, whatever the reference
    simpo = Config(method="simpo", beta=2.0, simpo_gamma=0.5)
    assert batch_loss(simpo, b, lp).loss.item() == pytest.approx(math.log(2))
    b2 = {**b, "ref_logps": b["ref_logps"] * 7}
    assert batch_loss(simpo, b2, lp).loss.item() == pytest.approx(math.log(2))
    orpo = Config(method="orpo", orpo_lambda=0.1)
    want = L.orpo_loss(torch.tensor([-0.5], dtype=torch.float64), torch.tensor([-0.75], dtype=torch.float64),
                       torch.tensor([0.5], dtype=torch.float64), lam=0.1).loss.item()
    assert batch_loss(orpo, b, lp).loss.item() == pytest.approx(want)
    assert batch_loss(orpo, b2, lp).loss.item() == pytest.approx(want)
    # KTO: z0 = mean(p - r) over the batch = mean(1, -1) = 0 (clamped at 0)
    kb = {"n": 2, "desirable": torch.tensor([True, False]), "ref_logps": torch.tensor([-2.0, -2.0], dtype=torch.float64)}
    k = batch_loss(Config(method="kto", beta=0.5), kb, torch.tensor([-1.0, -3.0], dtype=torch.float64))
    s = 1 / (1 + math.exp(-0.5))
    assert k.loss.item() == pytest.approx(2 * (1 - s)) and k.metrics["accuracy"].item() == 2


# ---------------------------------------------------------------- equivalence with TRL


def test_dpo_loss_and_rewards_equal_trl_dpotrainer(tmp_path, tiny_model_dir, tok, files):
    """Same tiny model, same 4 pairs, same reference: loss, implicit rewards, margins, accuracy and
    log-probs equal TRL's DPOTrainer (TRL is a test-only dependency)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(1)
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():  # policy != reference, so the rewards are not all zero
        for p in policy.parameters():
            p.add_(0.03 * torch.randn_like(p))
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    rows = qa_rows(4, 7)
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, use_cpu=True, bf16=False,
                     beta=0.1, max_length=None, report_to=[], disable_dropout=True)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(conv),
                         processing_class=tok)
    trl_rows = [trainer.train_dataset[i] for i in range(4)]
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(trl_rows)).item()
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    d = read_preferences(str(write_jsonl(tmp_path / "p.jsonl", conv)), ChatEncoder(tok), unit="pairs",
                         max_length=128)["train"]
    for i, r in enumerate(trl_rows):  # the very same token sequences
        assert d.seq(int(d.chosen[i])).tolist() == r["prompt_ids"] + r["chosen_ids"]
        assert d.seq(int(d.rejected[i])).tolist() == r["prompt_ids"] + r["rejected_ids"]
    batches = PreferenceBatches(d, unit="pairs", seed=0, pad_id=tok.pad_token_id, layout="pack", shuffle=False)
    import contextlib

    from lmforge.train.dpo import compute_reference
    batches.ref = compute_reference(ResponseLogProbs(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))), d,
                                    layout="pack", pad_id=tok.pad_token_id, batch_seqs=8, device="cpu",
                                    autocast=contextlib.nullcontext)
    b = batches.batch(0, 4)
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    fresh.load_state_dict(policy.state_dict())
    out = batch_loss(Config(method="dpo", beta=0.1), b, run_logprobs(ResponseLogProbs(fresh), b)[0])
    ours = {k: float(v) / 4 for k, v in out.metrics.items()}
    assert float(out.loss.detach()) / 4 == pytest.approx(trl_loss, abs=1e-5)
    assert ours["reward_chosen"] == pytest.approx(m["rewards/chosen"], abs=1e-5)
    assert ours["reward_rejected"] == pytest.approx(m["rewards/rejected"], abs=1e-5)
    assert ours["reward_margin"] == pytest.approx(m["rewards/margins"], abs=1e-5)
    assert ours["accuracy"] == m["rewards/accuracies"]
    assert ours["logp_chosen"] == pytest.approx(m["logps/chosen"], rel=1e-5)
    assert ours["logp_rejected"] == pytest.approx(m["logps/rejected"], rel=1e-5)
    assert abs(ours["reward_margin"]) > 0.01  # a non-trivial comparison


# ---------------------------------------------------------------- tiny runs


def test_tiny_dpo_run_raises_held_out_accuracy_and_moves_greedy_to_chosen(tmp_path, sft_start, files):
    m = run_dpo(tmp_path, dpo_config(sft_start, files))
    first, last = evals(tmp_path / "run")[0], evals(tmp_path / "run")[-1]
    assert first["val_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert last["val_accuracy"] >= 0.9
    # Greedy behaviour: the SFT model gives the wrong answer to a quarter or more of the held-out
    # prompts; after DPO it gives the right one to (almost) all of them, in real generations too.
    assert first["val_greedy_rejected"] >= 0.25 and last["val_greedy_rejected"] <= 0.05
    assert last["val_greedy_chosen"] >= max(0.9, first["val_greedy_chosen"] + 0.4)
    assert first["probe_rejected"] > 0 and last["probe_rejected"] == 0 and last["probe_chosen"] == 1.0
    assert last["val_logp_chosen"] > first["val_logp_chosen"]  # the chosen answer itself became likelier
    s = m["summary"]
    assert s["steps"] == 20 and s["pairs"] == 160 and s["reference_cached"] is False and s["pairs_per_s"] > 0
    rows = [r for r in RunDir(tmp_path / "run", "dpo", "model").read_metrics() if "loss" in r]
    assert {"reward_chosen", "reward_rejected", "reward_margin", "accuracy", "logp_chosen", "logp_rejected"} <= set(rows[0])
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "reference" / "train.npy").is_file()


def test_accuracy_up_while_greedy_behaviour_unchanged_is_visible(tmp_path, tiny_model_dir, files):
    """From the random model the chosen answer has ~zero probability: DPO reaches high pair
    accuracy by pushing the rejected answer down, greedy output never becomes the chosen answer,
    and the metrics show both."""
    run_dpo(tmp_path, dpo_config(tiny_model_dir, files, probe_prompts=0,
                                 train=dict(max_steps=12, lr=2e-3, eval_every=12)))
    first, last = evals(tmp_path / "run")[0], evals(tmp_path / "run")[-1]
    assert last["val_accuracy"] >= 0.9 and last["val_reward_margin"] > 1.0
    assert last["val_greedy_chosen"] == 0 and last["val_top1_chosen"] < 0.5
    assert first["val_greedy_chosen"] == 0


def test_lora_dpo_reference_is_the_base_and_only_the_adapter_trains(tmp_path, sft_start, files, tok):
    from transformers import AutoModelForCausalLM

    from lmforge.generation import load_model_for_inference

    cfg = dpo_config(sft_start, files, adapter={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                     probe_prompts=0, train=dict(max_steps=4, lr=3e-3, eval_every=0))
    m = run_dpo(tmp_path, cfg)
    run = tmp_path / "run"
    assert (run / "model" / "adapter_config.json").is_file() and m["summary"]["adapter"] == "lora"
    assert 0 < m["summary"]["trainable_parameters"] < m["summary"]["parameters"] / 4
    # the cached reference equals the base model's log-probs
    base = AutoModelForCausalLM.from_pretrained(str(sft_start)).eval()
    d = read_preferences(str(files[0]), ChatEncoder(tok), unit="pairs", max_length=128)["train"]
    ref = np.load(run / "reference" / "train.npy")
    for s in (0, 1, 50):
        assert ref[s] == pytest.approx(_naive(base, d.seq(s).tolist(), int(d.prompt_len[s])), abs=2e-4)
    merged, _ = load_model_for_inference(run, device="cpu", dtype="fp32")
    delta = [float((merged.state_dict()[k] - v).abs().max()) for k, v in base.state_dict().items()]
    assert max(delta) > 0  # the adapter changed the model


def test_kto_on_pairs_trains_without_error_and_reports(tmp_path, sft_start, files):
    m = run_dpo(tmp_path, dpo_config(sft_start, files, method="kto", probe_prompts=0,
                                     train=dict(max_steps=6, eval_every=6)))
    s = m["summary"]
    assert s["items"] == 320 and s["validation_items"] == 64 and s["method"] == "kto"
    assert s["val_accuracy"] > 0.5 and math.isfinite(s["train_loss"])


def test_reference_free_methods_make_no_reference_pass(tmp_path, sft_start, files):
    m = run_dpo(tmp_path, dpo_config(sft_start, files, method="simpo", probe_prompts=0,
                                     train=dict(max_steps=2, eval_every=0)))
    assert m["summary"]["reference_cached"] is None and not (tmp_path / "run" / "reference").exists()


# ---------------------------------------------------------------- pinned first losses, exact resume after SIGKILL


# The first four losses of a seeded 4-step run from the SFT start (full fine-tuning, and a LoRA
# adapter with RPO's NLL term), computed once with the code before the shared policy set-up
# (commit cf2b4ea) and pinned. Step 1's DPO loss is log 2 whatever the weights (policy ==
# reference); the later ones move with the seeding, the adapter's initialisation, the data order
# and the loss.
PINNED = {"none": [0.693147, 0.688471, 0.685087, 0.653003], "lora": [0.762579, 0.759241, 0.745718, 0.749098]}


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_first_losses_pinned(tmp_path, sft_start, files, adapter):
    over = {"method": "dpo"} if adapter == "none" else {"method": "rpo", "adapter": {"method": "lora", "r": 4}}
    cfg = dpo_config(sft_start, files, probe_prompts=0, train=dict(max_steps=4, eval_every=0), **over)
    run_dpo(tmp_path, cfg)
    assert first_losses(tmp_path / "run", "dpo", 4) == pytest.approx(PINNED[adapter], abs=1e-5)



def test_sigkilled_dpo_resumes_bitwise_equal_and_reuses_the_reference(tmp_path, sft_start, files, capsys):
    cfg = dpo_config(sft_start, files, probe_prompts=0, train=dict(max_steps=16, checkpoint_every=1, eval_every=8))
    run_dpo(tmp_path, cfg, name="ref")
    path = write_yaml(tmp_path / "c.yaml", cfg)
    out = tmp_path / "killed"
    killed_at = sigkill_after_checkpoint("dpo", path, out, 5)
    assert int(killed_at.name[5:]) < 16
    capsys.readouterr()
    m = run_single("dpo", str(path), [], out=str(out), force=False, resume=True, echo=lambda *a: None)
    assert f"resumed from checkpoint {killed_at}" in capsys.readouterr().out
    assert_bitwise_equal(load_file(str(tmp_path / "ref" / "model" / "model.safetensors")),
                         load_file(str(out / "model" / "model.safetensors")))
    assert m["summary"]["reference_cached"] is True  # read from reference/, not recomputed from trained weights
    steps = [r["step"] for r in RunDir(out, "dpo", "model").read_metrics() if "loss" in r]
    assert steps == list(range(1, 17))

"""Online RL rollouts and the set-up shared by the `ppo` and `grpo` stages.

    prompts ──chat template──> token ids (too long for the context: counted and skipped)
    step k: prompts_per_step prompts (an order that is a pure function of k) ──lmforge.generation
        (THE sampling path: KV cache, batching, per-row seeded streams)──> n responses each
        ──Rewards──> one score per response
        ──pack──> Rollout: (N, P + R) prompt left-padded + response right-padded, (N, R) masks
        ──score pass (no grad; same module, same micro-batches as the first update)──>
            old log-probs, values (PPO), entropy; reference log-probs

Why the old log-probs come from the training forward pass and not from the sampler: the ratio
pi/pi_old of the first update must be exactly 1, and two different code paths (incremental
decoding with a KV cache vs one full forward) agree only up to float rounding. The score pass runs
the exact forward the first micro-batches of the update run (same rows, same padding, same
temperature), so their ratio is bitwise 1 (`ratio_dev_first` in the metrics is max|ratio - 1| of
the first optimizer step: 0.0). The sampler's own log-probs are kept to check that both use the
same distribution (`sampler_logp_gap`, ~1e-6 in fp32): rollouts therefore sample with temperature
only, since top-p/top-k/penalties would make the sampling distribution differ from softmax(z / T).

Memory: the reference is the base with the adapter switched off (LoRA: no extra memory) or, for
full fine-tuning, a frozen copy of the starting weights (one more copy of the parameters, no
gradients or optimizer state). The PPO critic is a linear head on the policy's last hidden state
(hidden_size + 1 parameters): a shared backbone, so no second network is held, at the price that
the value loss also shapes the policy's features (`vf_coef` weighs it).

The optimizer step, logging (metrics.jsonl, TensorBoard), checkpoints, resume and SIGTERM are the
shared Trainer's (lmforge.train.loop), as in every training stage; a stage's loop reads
rollout -> score pass -> optimizer steps (Session.update) -> Session.end_step. Resuming continues
from the last completed rollout step: weights (adapter + value head), optimizer, schedule, RNG and
the stage's own state (e.g. the adaptive KL coefficient) are checkpointed, and the prompts and
sampling seeds of step k depend only on k, so a resumed run equals an uninterrupted one.

Several processes (torchrun / accelerate launch; DDP): each samples and scores a contiguous share
of the step's prompts, response j of prompt i drawing from random stream i * group + j whichever
process samples it; the shares are gathered so every process holds the whole rollout (so the
advantages, whitening and metrics are those of one process). Each optimizer step's rows are then
split between the processes, and gradients averaged: the run equals one process with the same
global batch (batch_size x grad_accum x processes rows per optimizer step) to float rounding.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from lmforge import losses as L
from lmforge.adapters import AdapterConfig, trainable_report
from lmforge.config import Device, Schema, TrainConfig
from lmforge.data.chat import encode as encode_chat
from lmforge.data.formats import OnBadRows, ReadStats
from lmforge.data.preference import read_prompt_rows
from lmforge.errors import LmforgeError, StopRun
from lmforge.generation import Completion, SamplingParams, generate
from lmforge.models import cache_kwarg, context_length, output_cache
from lmforge.rewards import Rewards, RewardSpec
from lmforge.rundir import RunDir, atomic_write_text
from lmforge.train import policy
from lmforge.train.guards import GuardConfig
from lmforge.train.loop import Trainer, make_accelerator

# --------------------------------------------------------------------------------------------
# Configuration shared by ppo and grpo


def _rl_train() -> TrainConfig:
    return TrainConfig(max_steps=100, batch_size=8, lr=1e-5, schedule="constant", warmup_steps=0, weight_decay=0.0,
                       checkpoint_every=10, log_every=1, eval_every=0, keep_best=False, compile=False)


# Set in a stage's `train:`, these would be silently ignored: the RL stages have no validation loss.
_NO_EVAL = ("eval_every", "eval_batches", "keep_best", "early_stopping_patience")


class RolloutConfig(Schema):
    """How responses are sampled. Temperature only: the ratio's log-probs are softmax(z / T)."""

    temperature: float = Field(1.0, gt=0, le=10, allow_inf_nan=False,
                               description="Sampling temperature; the training log-probs use the same one.")
    max_new_tokens: int = Field(64, ge=1, description="Longest response; one that reaches it has no EOS.")
    max_batch: int = Field(64, ge=1, description="Responses decoded together by the generation engine.")


class RLFields(Schema):
    """Fields of `ppo` and `grpo` (see lmforge.train.rollout)."""

    model: str | None = Field(None, description="Starting policy: an SFT stage folder, model folder or adapter folder.")
    prompts: str | list[str] | None = Field(
        None, description="Prompt rows ({prompt: text or turns} or {messages}): JSONL/Parquet/CSV files, globs or a "
        "`datasets` folder; other fields (e.g. `answer`) reach the reward functions.")
    dataset_split: str | None = Field(None, description="Split to read from a DatasetDict folder.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    system_prompt: str | None = Field(None, description="System turn put before text prompts that have none.")
    on_bad_rows: OnBadRows = Field("error", description="error = stop at a bad prompt row naming it; skip = count it.")
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="Weighted reward terms, summed (answer, format, contains, function, "
        "reward_model); empty = the reward model alone.")
    reward_model: str | None = Field(None, description="Reward model folder (a reward stage) for reward_model terms.")
    allow_tokenizer_mismatch: bool = Field(
        False, description="Accept a reward model whose tokenizer differs from the policy's (it re-encodes the text).")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the reward of a response cut at max_new_tokens without EOS (None = off).")
    prompts_per_step: int = Field(16, ge=1, description="Prompts sampled per rollout step.")
    epochs: int = Field(1, ge=1, description="Passes over each rollout (PPO epochs); its rows are shuffled per pass.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Sampling settings of the rollouts.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Full fine-tuning or a peft adapter.")
    sample_every: int = Field(10, ge=0, description="Write a few sample responses every N steps (0 = never).")
    samples_shown: int = Field(3, ge=1, description="Sample responses written each time (log.txt, samples.jsonl).")
    device: Device = Field(None, description="Reward model device (None = the policy's).")
    guards: GuardConfig = Field(default_factory=GuardConfig, description="Stop the run, keeping its best weights, when "
                                "the reward is being gamed (see lmforge.train.guards); all off by default.")
    train: TrainConfig = Field(
        default_factory=_rl_train, description="Optimiser settings; max_steps counts rollout steps (the LR schedule "
        "moves once per rollout step), batch_size x grad_accum rows per process make one optimizer step; the "
        "evaluation fields, compile and fsdp are refused (no validation loss; see lmforge.train.rollout).")

    @field_validator("train", mode="before")
    @classmethod
    def _rl_train_defaults(cls, v: Any) -> Any:
        """A partial `train:` fills up from the RL defaults (lr 1e-5, constant, ...), not the pre-training ones."""
        if not isinstance(v, dict):
            return v
        bad = [k for k in _NO_EVAL if k in v and v[k] not in (None, 0, False)]
        if bad:
            raise ValueError(f"train.{bad[0]} needs a validation loss, which RL stages do not have (they log the "
                             "reward and KL every step); remove it")
        return {**_rl_train().model_dump(), **v}

    @model_validator(mode="after")
    def _rl_checks(self) -> "RLFields":
        if self.adapter.method == "prefix":
            raise ValueError("prefix tuning adds key/value positions the sampler and the scoring forward do not share; "
                             "use adapter.method lora, dora or qlora")
        t = self.train
        if t.early_stopping_patience is not None or t.eval_every or t.keep_best:
            raise ValueError("train.early_stopping_patience, eval_every and keep_best need a validation loss, which RL "
                             "stages do not have")
        if t.compile is True:  # "auto" runs eagerly here (the Trainer logs it)
            raise ValueError("train.compile is refused by the RL stages: every rollout has new shapes (a recompile per "
                             "step), and the first update's ratio must be bitwise 1 between the no-grad score pass and "
                             "the update; set train.compile: false")
        if t.fsdp:
            raise ValueError("train.fsdp is refused by the RL stages: each process samples with the whole policy, so "
                             "it cannot be sharded; set train.fsdp: false (several processes then use DDP)")
        return self

    def rows_per_rollout(self, group: int) -> int:
        return self.prompts_per_step * group


def check_minibatches(cfg: RLFields, n_rows: int, world: int = 1) -> int:
    """Optimizer steps per rollout; one sentence if the rollout does not split into whole steps."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    if n_rows % per_step:
        by = " x processes" if world > 1 else ""
        raise LmforgeError(f"A rollout holds {n_rows} responses, which train.batch_size x train.grad_accum{by} = "
                           f"{per_step} does not divide; make prompts_per_step (x group_size) a multiple of it.")
    return cfg.epochs * n_rows // per_step


# --------------------------------------------------------------------------------------------
# Rollout tensors


@dataclass
class Rollout:
    """N responses packed for the scoring/training forward.

    input_ids[i] = pad...pad prompt_i response_i pad...pad with the prompt ending at column P, so
    the logits at columns P-1 .. P+R-2 predict response tokens 0 .. R-1.
    """

    input_ids: torch.Tensor  # (N, P + R) long
    attention_mask: torch.Tensor  # (N, P + R) long, 1 = real token
    n_prompt: int  # P
    mask: torch.Tensor  # (N, R) float, 1 = a response token (the final EOS included)
    finished: torch.Tensor  # (N,) bool: ended with EOS / a stop token (else cut at max_new_tokens)
    sampler_logp: torch.Tensor  # (N, R) the generation path's log-probs of the sampled tokens
    texts: list[str]
    prompt_index: list[int]  # which of the step's prompts each row answers
    prompt_lens: list[int]
    resp_lens: list[int]
    group: int = 1  # rows come in blocks of `group` responses to one prompt
    scores: torch.Tensor | None = None  # (N,) reward after the missing-EOS penalty
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    old_logp: torch.Tensor | None = None  # (N, R) from the score pass
    values: torch.Tensor | None = None  # (N, R) critic values (PPO)
    ref_logp: torch.Tensor | None = None  # (N, R)
    entropy: torch.Tensor | None = None  # (N, R)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response(self) -> torch.Tensor:
        return self.input_ids[:, self.n_prompt:]

    def micro(self, idx: torch.Tensor, **per_token: torch.Tensor) -> dict:
        """Rows `idx`, cut to the columns they use (less padding); per-token (N, R) tensors likewise."""
        rows = idx.tolist()
        left = self.n_prompt - max(self.prompt_lens[i] for i in rows)
        r = max(self.resp_lens[i] for i in rows)
        ids = self.input_ids[idx, left:self.n_prompt + r]
        g = self.group
        whole = g > 1 and len(rows) % g == 0 and all(
            rows[k] % g == 0 and rows[k:k + g] == list(range(rows[k], rows[k] + g)) for k in range(0, len(rows), g))
        out = {"input_ids": ids, "attention_mask": self.attention_mask[idx, left:self.n_prompt + r],
               "n_prompt": self.n_prompt - left, "labels": ids[:, self.n_prompt - left:], "mask": self.mask[idx, :r],
               "group": g if whole else 1}
        out.update({k: v[idx, :r] for k, v in per_token.items()})
        return out


def pack(prompts: list[list[int]], comps: list[Completion], *, pad_id: int, device) -> Rollout:
    """Rollout tensors from each row's prompt ids and its sampled completion."""
    P = max(len(p) for p in prompts)
    R = max(len(c.token_ids) for c in comps)
    N = len(comps)
    ids = torch.full((N, P + R), pad_id, dtype=torch.long)
    att = torch.zeros((N, P + R), dtype=torch.long)
    mask = torch.zeros((N, R))
    slp = torch.zeros((N, R))
    for i, (p, c) in enumerate(zip(prompts, comps)):
        n = len(c.token_ids)
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + n] = torch.tensor(c.token_ids)
        att[i, P - len(p):P + n] = 1
        mask[i, :n] = 1
        if c.logprobs is not None:
            slp[i, :n] = torch.tensor(c.logprobs)
    finished = torch.tensor([c.finish_reason == "stop" for c in comps])
    return Rollout(ids.to(device), att.to(device), P, mask.to(device), finished.to(device), slp.to(device),
                   [c.text for c in comps], [c.prompt_index for c in comps], [len(p) for p in prompts],
                   [len(c.token_ids) for c in comps])


# --------------------------------------------------------------------------------------------
# The scoring / training forward


class PolicyValue(torch.nn.Module):
    """The policy (plain or peft) plus, for PPO, a linear value head on its last hidden state.

    forward returns the response positions' logits (B, R, V) — `logits_to_keep` spares the
    prompt's (B, P, V) — and the values (B, R) read at the same positions (the state before each
    response token). Being one Module, it is what accelerate prepares and what a checkpoint saves.
    """

    def __init__(self, lm, *, value_head: bool):
        super().__init__()
        self.lm = lm
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.value_head = torch.nn.Linear(cfg.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no made-up baseline
            torch.nn.init.zeros_(self.value_head.bias)
            self.value_head.to(next(lm.parameters()).device)

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, input_ids, attention_mask, n_prompt: int, group: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`group` > 1: rows come in blocks of `group` responses to one prompt (GRPO), and the prompt is
        run once per block, its KV cache repeated for the block's responses: the same function of the
        inputs as group 1, computed without (group - 1) / group of the prompt positions."""
        R = input_ids.shape[1] - n_prompt
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as the sampler numbers left-padded rows
        hidden = self.value_head is not None
        if group == 1:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                          logits_to_keep=R + 1, output_hidden_states=hidden)
            logits = out.logits[:, :-1]  # (B, R, V): column P-1+t predicts response token t
            h = out.hidden_states[-1][:, n_prompt - 1:-1] if hidden else None  # (B, R, d), the final (normed) layer
        else:
            head = self.lm(input_ids=input_ids[::group, :n_prompt], attention_mask=attention_mask[::group, :n_prompt],
                           position_ids=pos[::group, :n_prompt], use_cache=True, logits_to_keep=1,
                           output_hidden_states=hidden)
            logits = head.logits.repeat_interleave(group, 0)  # (B, 1, V): predicts response token 0
            h = head.hidden_states[-1][:, -1:].repeat_interleave(group, 0) if hidden else None
            if R > 1:  # response tokens 0..R-2 predict tokens 1..R-1 (the last one predicts nothing we score)
                cache = output_cache(head)
                cache.batch_repeat_interleave(group)  # differentiable: gradients of the block add up in the prompt
                rest = self.lm(input_ids=input_ids[:, n_prompt:-1], attention_mask=attention_mask[:, :-1],
                               position_ids=pos[:, n_prompt:-1], use_cache=True, **{cache_kwarg(self.lm): cache},
                               output_hidden_states=hidden)
                logits = torch.cat([logits, rest.logits], 1)
                h = torch.cat([h, rest.hidden_states[-1]], 1) if hidden else None
        values = None
        if self.value_head is not None:
            values = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logits, values


def entropy_of(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position: logsumexp(z) - sum p z; (B, R, V) -> (B, R)."""
    z = logits.float() / temperature
    return torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)


@torch.no_grad()
def score_pass(net, ref, ro: Rollout, chunks: list[torch.Tensor], *, temperature: float, autocast,
               old: bool = True, reference: bool = True) -> None:
    """Fill ro.old_logp / values / entropy (the policy as it is now) and ro.ref_logp, chunk by chunk.

    `chunks` must be the micro-batches of the first update, in order: the same inputs through the
    same forward give bitwise the same log-probs, so the first update's ratio is exactly 1.
    `ref` is a frozen reference PolicyValue, or None for the policy with its adapter disabled.
    """
    N, R = ro.mask.shape
    dev = ro.mask.device
    zeros = lambda: torch.zeros(N, R, device=dev)  # noqa: E731
    if old:
        ro.old_logp, ro.entropy = zeros(), zeros()
    if reference:
        ro.ref_logp = zeros()
    for idx in chunks:
        mb = ro.micro(idx)
        r = mb["labels"].shape[1]
        with autocast():
            if old:
                logits, values = forward(net, mb)
                ro.old_logp[idx, :r] = L.token_logprobs(logits, mb["labels"], temperature=temperature) * mb["mask"]
                ro.entropy[idx, :r] = entropy_of(logits, temperature) * mb["mask"]
                if values is not None:
                    if ro.values is None:
                        ro.values = zeros()
                    ro.values[idx, :r] = values * mb["mask"]
            if reference:
                if ref is not None:
                    logits, _ = forward(ref, mb)
                else:
                    with _unwrap(net).lm.disable_adapter():
                        logits, _ = forward(net, mb)
                ro.ref_logp[idx, :r] = L.token_logprobs(logits, mb["labels"], temperature=temperature) * mb["mask"]


def forward(net, mb: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits (B, R, V), values) of a micro-batch from `Rollout.micro`."""
    return net(mb["input_ids"], mb["attention_mask"], mb["n_prompt"], mb["group"])


def _unwrap(net):
    return getattr(net, "module", net)


# --------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompts:
    turns: list[list[dict]]
    rows: list[dict]
    wheres: list[str]
    ids: list[list[int]]
    skipped_too_long: int
    read: dict


def load_prompts(cfg: RLFields, tokenizer, context: int, *, stage: str) -> Prompts:
    """Every usable prompt as chat-rendered token ids; prompts that leave no room for max_new_tokens
    in the context are counted and skipped (an error if none is left)."""
    if cfg.prompts is None:
        raise LmforgeError(f"{stage} needs `prompts`: rows with a 'prompt' (text or turns) or 'messages'.")
    stats = ReadStats()
    got = read_prompt_rows(cfg, stats)
    if not got:
        names = cfg.prompts if isinstance(cfg.prompts, str) else ", ".join(cfg.prompts)
        skipped = f" ({stats.total_skipped} bad rows skipped)" if stats.total_skipped else ""
        raise LmforgeError(f"{stage}: prompts {names} hold no prompt rows{skipped}; add rows with a 'prompt' or "
                           "'messages'.")
    ids = [encode_chat(tokenizer, t, add_generation_prompt=True) for t, _, _ in got]  # typed markers stay text
    room = context - cfg.rollout.max_new_tokens
    keep = [i for i, x in enumerate(ids) if 0 < len(x) <= room]
    skipped = len(got) - len(keep)
    if not keep:
        raise LmforgeError(f"No prompt of {cfg.prompts} fits the model's context of {context} tokens with "
                           f"rollout.max_new_tokens {cfg.rollout.max_new_tokens} ({len(got)} read, {skipped} too long); "
                           "lower max_new_tokens or shorten the prompts.")
    return Prompts([got[i][0] for i in keep], [got[i][1] for i in keep], [got[i][2] for i in keep],
                   [ids[i] for i in keep], skipped, stats.as_dict())


def prompt_indices(n_prompts: int, step: int, per_step: int, seed: int) -> list[int]:
    """The prompts of rollout step `step`: consecutive positions of a per-epoch shuffled order, a
    pure function of the step (so a resumed run samples the same prompts)."""
    perms: dict[int, np.ndarray] = {}
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(pos, n_prompts)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        out.append(int(perms[epoch][k]))
    return out


def epoch_orders(n_rows: int, epochs: int, step: int, seed: int, group: int = 1) -> list[torch.Tensor]:
    """Row order of each pass over a rollout: the first in rollout order (the score pass's chunks),
    the later ones shuffled by whole groups (a prompt's responses stay together), a pure function of
    (seed, step, epoch)."""
    orders = [torch.arange(n_rows)]
    for e in range(1, epochs):
        perm = torch.from_numpy(np.random.default_rng([seed, step, e]).permutation(n_rows // group))
        orders.append((perm.unsqueeze(1) * group + torch.arange(group)).flatten())
    return orders


def sampling_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 1) % (2**62)


# --------------------------------------------------------------------------------------------
# The session: everything a stage's loop needs, set up once


@dataclass
class MicroOut:
    """One micro-batch's loss, as ppo_micro_loss / grpo_micro_loss return it."""

    loss: torch.Tensor  # SUM over the micro-batch's response tokens (differentiable)
    stats: dict[str, torch.Tensor]  # detached sums over tokens (no host sync until the step is logged)
    ratio_dev: torch.Tensor  # max |ratio - 1| over the micro-batch's tokens


@dataclass
class Updates:
    """What the optimizer steps of one rollout step report (summed over processes)."""

    sums: dict[str, float]  # the MicroOut stats
    ratio_dev_first: float  # max |ratio - 1| in the first optimizer step (0.0: see the module docstring)
    grad_norm: float  # of the last optimizer step


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of n items that process `rank` of `world` takes: contiguous, sizes differing by <= 1."""
    return rank * n // world, (rank + 1) * n // world


@dataclass
class Session:
    cfg: RLFields
    rd: RunDir
    stage: str
    t: Trainer  # the shared step machinery: optimizer step, logging, checkpoints, resume, SIGTERM
    tokenizer: Any
    lm: Any  # the policy (peft model with an adapter)
    ref: Any  # frozen reference PolicyValue, or None (adapter disabled, or no reference needed)
    rewards: Rewards
    prompts: Prompts
    base_dir: Path
    group: int  # responses per prompt

    @property
    def net(self):
        """PolicyValue as prepared by accelerate (DDP with several processes)."""
        return self.t.engine

    @property
    def step(self) -> int:
        return self.t.step

    @property
    def state(self) -> dict:
        return self.t.state

    # ---- one rollout ------------------------------------------------------------------------

    def sampler(self):
        """The model the generation engine drives: the peft model's base (LoRA is injected into it)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def rollout(self) -> Rollout:
        """Sample group responses for this step's prompts and score them. Each process samples and
        scores its share of the prompts, then every process receives the whole rollout: response j
        of the step's prompt i samples from random stream i * group + j whichever process draws it,
        so the rollout is the one a single process would sample. Nothing is updated yet, so an error
        here (a reward function that fails on some row) keeps the completed steps: they are
        checkpointed before the one sentence reaches the user."""
        from accelerate.utils import gather_object

        cfg, t = self.cfg, self.t
        idx = prompt_indices(len(self.prompts.ids), self.step, cfg.prompts_per_step, cfg.train.seed)
        lo, hi = share(len(idx), t.rank, t.world)
        mine, error = None, None
        try:
            mine = self._sample_and_score(idx[lo:hi], first_stream=lo * self.group)
        except LmforgeError as e:
            if isinstance(e, StopRun):
                raise
            error = str(e)
        got = gather_object([(mine, error)])  # one (share, error) per process, in rank order
        errors = [e for _, e in got if e is not None]
        if errors:
            self._stop(errors[0])
        shares = [m for m, _ in got]
        comps = [c for m in shares for c in m[0]]
        rows = [r for m in shares for r in m[1]]
        total = [x for m in shares for x in m[2]]
        ro = pack([self.prompts.ids[i] for i in rows], comps, pad_id=self.tokenizer.pad_token_id, device=t.acc.device)
        ro.parts = {k: np.concatenate([m[3][k] for m in shares]) for k in shares[0][3]}
        scores = torch.tensor(total, dtype=torch.float32, device=t.acc.device)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~ro.finished).float()
        ro.scores = scores
        ro.prompt_index = rows  # indices into all prompts
        ro.group = self.group
        return ro

    def _sample_and_score(self, idx: list[int], *, first_stream: int):
        cfg = self.cfg
        params = SamplingParams(temperature=cfg.rollout.temperature, top_p=1.0, top_k=0,
                                max_new_tokens=cfg.rollout.max_new_tokens, n=self.group,
                                seed=sampling_seed(cfg.train.seed, self.step), logprobs=True)
        was = self.lm.training
        self.lm.eval()
        with self.t.acc.autocast():
            comps = generate(self.sampler(), self.tokenizer, [self.prompts.ids[i] for i in idx], params,
                             max_batch=cfg.rollout.max_batch, seed_stream=first_stream)
        self.lm.train(was)
        rows = [idx[c.prompt_index] for c in comps]
        total, parts = self.rewards.score(
            [self.prompts.turns[i] for i in rows], [c.text for c in comps], [self.prompts.rows[i] for i in rows],
            [f"{self.prompts.wheres[i]} (step {self.step + 1})" for i in rows])
        return comps, rows, list(total), parts

    def _stop(self, error: str) -> None:
        if self.step == 0 or self.step == self.t.last_saved:
            raise LmforgeError(error)
        self.t.save_checkpoint()  # every process: it is collective
        raise LmforgeError(f"{error} The {self.step} completed steps are saved in {self.rd.checkpoints}; fix it and "
                           "re-run with --resume.")

    # ---- the optimizer steps of a rollout step --------------------------------------------------

    def micro_batches(self, order: torch.Tensor) -> list[list[torch.Tensor]]:
        """This process's micro-batches of each optimizer step of one pass over the rollout: a step
        takes batch_size x grad_accum x processes rows of `order`, each process its own share, so the
        update is the one a single process makes on the same rows (gradients are averaged)."""
        t, b = self.t, self.cfg.train.batch_size
        per_step = b * self.cfg.train.grad_accum * t.world
        steps = []
        for start in range(0, len(order), per_step):
            lo, hi = share(per_step, t.rank, t.world)
            mine = order[start + lo:start + hi]
            steps.append([mine[i:i + b] for i in range(0, len(mine), b)])
        return steps

    def score(self, ro: Rollout, order: torch.Tensor, *, old: bool = True, reference: bool = True) -> None:
        """score_pass over this process's first-pass micro-batches (so the first update's ratio is
        exactly 1), then every process receives the other processes' rows (each row is filled by
        one process, zeros elsewhere: the sum is exact)."""
        chunks = [c for step in self.micro_batches(order) for c in step]
        score_pass(self.net, self.ref, ro, chunks, temperature=self.cfg.rollout.temperature,
                   autocast=self.t.acc.autocast, old=old, reference=reference)
        if self.t.world > 1:
            for name in ("old_logp", "entropy", "values", "ref_logp"):
                x = getattr(ro, name)
                if x is not None:
                    setattr(ro, name, self.t.acc.reduce(x, reduction="sum"))

    def update(self, ro: Rollout, orders: list[torch.Tensor],
               micro_loss: Callable[[torch.Tensor, int], MicroOut]) -> Updates:
        """Every optimizer step of the rollout step on the shared Trainer: `orders` holds one row
        order per epoch; micro_loss(rows, epoch) runs the forward of those rows and returns their
        SUMMED loss. The step's loss is divided by its token count on all processes."""
        t = self.t
        sums: dict[str, torch.Tensor] = {}
        ratio_dev_first, grad_norm = None, 0.0
        per_step = self.cfg.train.batch_size * self.cfg.train.grad_accum * t.world
        for e, order in enumerate(orders):
            for k, chunks in enumerate(self.micro_batches(order)):
                n_tok = float(ro.mask[order[k * per_step:(k + 1) * per_step]].sum())  # every process has all rows
                loss_sum = dev = torch.zeros((), device=t.acc.device)
                for a, idx in enumerate(chunks):  # micro-batches (gradient accumulation)
                    with t.micro_step(last=a == len(chunks) - 1):
                        out = micro_loss(idx, e)
                        t.backward(out.loss, n_tok)
                    loss_sum = loss_sum + out.loss.detach()
                    dev = torch.maximum(dev, out.ratio_dev)
                    for name, v in out.stats.items():
                        sums[name] = sums.get(name, 0) + v
                _, grad_norm = t.update(loss_sum, n_tok)
                if ratio_dev_first is None:
                    ratio_dev_first = t.global_max(dev)
        return Updates(t.global_sums(sums), ratio_dev_first, grad_norm)

    # ---- the step boundary ----------------------------------------------------------------------

    def end_step(self, record: dict, ro: Rollout) -> None:
        """The schedule moves on, the step is logged, samples written, a checkpoint taken when due
        or on SIGTERM (then Preempted)."""
        t = self.t
        t.advance()
        if t.log_due:
            t.log({"step": t.step, **record, "lr": t.lr, "elapsed_s": time.time() - t.t_start})
        t.progress.update(t.step, **{k: record[k] for k in ("reward", "kl") if record.get(k) is not None})
        if self.cfg.sample_every and (t.step % self.cfg.sample_every == 0 or t.step == 1) and t.main:
            self.write_samples(ro)
        t.boundary()

    def write_samples(self, ro: Rollout) -> None:
        lines = []
        for i in range(0, len(ro), self.group)[:self.cfg.samples_shown]:  # one response per prompt
            p = self.prompts.turns[ro.prompt_index[i]]
            rec = {"step": self.step, "prompt": p[-1]["content"], "response": ro.texts[i],
                   "reward": float(ro.scores[i]), "finished": bool(ro.finished[i])}
            lines.append(json.dumps(rec, ensure_ascii=False))
            self.rd.log(f"sample step {self.step}: {rec['prompt']!r} -> {rec['response']!r} (reward {rec['reward']:.3g})")
        with open(self.rd.path / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(x + "\n" for x in lines))

    # ---- the artifact ---------------------------------------------------------------------------

    def finish(self, summary: dict) -> dict:
        """Write model/ (HF model or adapter; the PPO value head beside it; process 0) and return the summary."""
        from safetensors.torch import save_file

        self.t.finish()
        trainable, total = trainable_report(self.lm)
        summary = {"steps": self.step, "adapter": self.cfg.adapter.method, "parameters": total,
                   "trainable_parameters": trainable, "prompts": len(self.prompts.ids),
                   "prompts_skipped_too_long": self.prompts.skipped_too_long,
                   "skipped_prompt_rows": self.prompts.read.get("skipped"),
                   "train_seconds": round(time.time() - self.t.t_start, 2), "stopped_by": self.t.stopped_by, **summary}

        def value_head(folder: Path) -> None:
            head = _unwrap(self.net).value_head
            if head is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                          str(folder / "value_head.safetensors"))

        policy.save(self.lm, self.tokenizer, self.rd, self.t.acc, adapter=self.cfg.adapter, base_dir=self.base_dir,
                    extra={"stage": self.stage, "summary": summary}, also=value_head)
        return summary


def setup(cfg: RLFields, rd: RunDir, resume: bool, *, stage: str, group: int, value_head: bool,
          reference: bool) -> Session:
    """Load the policy (+ adapter, + value head), the reference, the rewards and the prompts; set up
    the shared Trainer (optimizer, schedule, DDP, resume). Cheap checks (prompts, rewards) run
    before the model loads."""

    acc = make_accelerator(cfg.train)
    begin = policy.start(cfg.model, stage=stage)
    src, tokenizer = begin.src, begin.tokenizer
    rewards = Rewards.build(cfg.rewards, reward_model=cfg.reward_model, policy_tokenizer=tokenizer,
                            policy_source=str(src), device=cfg.device or acc.device,
                            allow_tokenizer_mismatch=cfg.allow_tokenizer_mismatch)
    pol = policy.setup(begin, adapter=cfg.adapter, seed=cfg.train.seed, acc=acc, rd=rd)  # dropout off: exact ratios
    lm, base_dir = pol.model, pol.base_dir
    prompts = load_prompts(cfg, tokenizer, context_length(lm) or 1 << 30, stage=stage)
    rewards.check_rows(prompts.rows, prompts.wheres)
    check_minibatches(cfg, cfg.rows_per_rollout(group), acc.num_processes)
    ref = None
    if reference and not cfg.adapter.enabled:
        ref = PolicyValue(copy.deepcopy(lm).requires_grad_(False).eval(), value_head=False)
    net = PolicyValue(lm, value_head=value_head)
    t = Trainer(net, cfg=cfg.train, rd=rd, resume=resume, label=stage, accelerator=acc, guards=cfg.guards)
    if t.resumed_from is not None and t.main:
        _truncate_samples(rd, t.step)
    trainable, total = trainable_report(lm)
    line = (f"{stage}: {total:,} parameters ({trainable:,} trainable, adapter {cfg.adapter.method}"
            f"{', + value head' if value_head else ''}), {len(prompts.ids)} prompts ({prompts.skipped_too_long} too long "
            f"for the context, skipped), rewards {', '.join(rewards.names)}, device {acc.device}, "
            f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''}")
    if t.main:
        print(line)
        rd.log(line)
    return Session(cfg, rd, stage, t, tokenizer, lm, ref, rewards, prompts, base_dir, group)


def _truncate_samples(rd: RunDir, step: int) -> None:
    p = rd.path / "samples.jsonl"
    if p.is_file():
        keep = [x for x in p.read_text(encoding="utf-8").splitlines() if x and json.loads(x).get("step", 0) <= step]
        atomic_write_text(p, "".join(x + "\n" for x in keep))

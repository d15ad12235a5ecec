"""Active selection: serve first the items whose judgment teaches the most.

With one reward model, an item is as uncertain as the Bradley-Terry probability that its best
response beats its runner-up is close to 1/2:

    uncertainty = 1 - |2 * sigmoid(r_best - r_second) - 1|        (1 = a coin flip, 0 = settled)

With two reward models (say, last round's and this round's), an item comes first when they order
its responses most differently: the share of response pairs they order oppositely (discordant
pairs, i.e. (1 - Kendall's tau) / 2 without ties). Ties in disagreement fall back to the mean
uncertainty. The order is written as item positions (store.set_positions); items already served
keep their place in nobody's queue, since serving order only matters for unclaimed ones.
"""

from __future__ import annotations

import itertools
import math

from lmforge.label.store import Store


def uncertainty(rewards: list[float]) -> float:
    """1 - |2 sigmoid(top - second) - 1| of one item's rewards (>= 2 of them)."""
    top, second = sorted(rewards, reverse=True)[:2]
    p = 1.0 / (1.0 + math.exp(-(top - second)))
    return 1.0 - abs(2.0 * p - 1.0)


def disagreement(a: list[float], b: list[float]) -> float:
    """Share of response pairs that rewards `a` and `b` order oppositely (a tie in either: not counted)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    bad = sum(1 for i, j in pairs if (a[i] - a[j]) * (b[i] - b[j]) < 0)
    return bad / len(pairs)


def priority(scores: list[list[float]]) -> tuple[float, float]:
    """Sort key (lower first) of one item given each reward model's rewards of its responses."""
    u = sum(uncertainty(s) for s in scores) / len(scores)
    d = disagreement(scores[0], scores[1]) if len(scores) >= 2 else 0.0
    return (-d, -u)


def select(store: Store, reward_models: list[str], *, device: str | None = None, batch_size: int = 32) -> dict:
    """Reorder the store's items by `priority` under the given reward models; returns a summary."""
    from lmforge.scoring import load_reward_model

    items = [store.item(i) for i in store.item_ids()]
    scores: list[list[list[float]]] = [[] for _ in items]
    for path in reward_models:
        rm = load_reward_model(path, device=device)
        prompts = [it["prompt"] for it in items for _ in it["responses"]]
        texts = [r["text"] for it in items for r in it["responses"]]
        flat = rm.score(prompts, texts, batch_size=batch_size)
        k = 0
        for n, it in enumerate(items):
            scores[n].append([float(x) for x in flat[k:k + len(it["responses"])]])
            k += len(it["responses"])
        del rm
    keys = [priority(s) for s in scores]
    order = sorted(range(len(items)), key=lambda n: (keys[n], items[n]["id"]))
    store.set_positions({items[n]["prompt_id"]: rank for rank, n in enumerate(order)})
    return {"reward_models": list(reward_models), "first": [items[n]["prompt_id"] for n in order[:5]],
            "mean_uncertainty": round(sum(-k[1] for k in keys) / max(len(keys), 1), 4),
            "mean_disagreement": round(sum(-k[0] for k in keys) / max(len(keys), 1), 4)}

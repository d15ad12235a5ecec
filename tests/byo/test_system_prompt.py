"""SFT's `system_prompt` option: one text, or a list sampled per row (seeded), for a share of rows."""

from __future__ import annotations

from lmforge.data.formats import ReadStats
from lmforge.data.sft import iter_conversations

from ..data.test_sft_data import write_jsonl

ROWS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(200)]
KEPT = {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"},
                     {"role": "assistant", "content": "a"}]}


def systems(path, **kw) -> list[str | None]:
    convs = iter_conversations(str(path), fmt="auto", on_bad_rows="error", stats=ReadStats(), **kw)
    return [m[0]["content"] if m[0]["role"] == "system" else None for _, m, _ in convs]


def test_fixed_sampled_and_shared_system_prompts(tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", [KEPT, *ROWS])
    assert systems(f) == ["own"] + [None] * 200
    assert systems(f, system_prompt="Be brief.") == ["own"] + ["Be brief."] * 200
    pool = ["A.", "B.", "C."]
    drawn = systems(f, system_prompt=pool, seed=1)
    assert drawn[0] == "own" and set(drawn[1:]) == set(pool)  # every one drawn, the row's own kept
    assert all(drawn[1:].count(p) > 40 for p in pool)
    assert systems(f, system_prompt=pool, seed=1) == drawn  # seeded: the same rows get the same prompt
    assert systems(f, system_prompt=pool, seed=2) != drawn
    half = systems(f, system_prompt="S.", system_share=0.5, seed=0)
    assert 70 < half[1:].count("S.") < 130 and half[1:].count(None) == 200 - half[1:].count("S.")
    assert systems(f, system_prompt="S.", system_share=0.0) == ["own"] + [None] * 200

"""The generation path: each sampling control against its definition, the batched engine
against one-by-one and against transformers, stopping, seeds, log-probs, model loading."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import validate
from lmforge.errors import LmforgeError
from lmforge.generation import (
    Engine,
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    decode_delta,
    find_stop,
    generate,
    generate_file,
    load_model_for_inference,
    min_p_filter,
    sample_from_logits,
    sampling_params,
    stop_holdback,
    stream,
    top_k_filter,
    top_p_filter,
)

INF = float("inf")
PROMPTS = ["Hello", "The quick brown fox jumps over", "What is two plus two? Two plus", "A",
           "The old miller carries three apples to the northern"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    # Tiny tensors: extra OpenMP threads only add contention on a shared CI machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model_for_inference(tiny_model_dir, device="cpu")
    torch.set_num_threads(n)


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row > -INF).flatten().tolist() for row in logits]


# --------------------------------------------------------------------------------------------
# Logits processing on hand-built logits


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 5.0, 2.0],
                           [4.0, 3.0, 3.0, 3.0, 1.0],
                           [4.0, 3.0, 3.0, 3.0, 1.0]])
    out = top_k_filter(logits, torch.tensor([2, 2, 0]))
    assert kept(out)[0] == [1, 3]
    # Three tokens tie for second place: exactly 2 survive, the best one among them.
    assert len(kept(out)[1]) == 2 and 0 in kept(out)[1]
    assert kept(out)[2] == [0, 1, 2, 3, 4]  # k = 0 is off
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])  # kept logits are unchanged
    assert kept(top_k_filter(logits, 5)) == [[0, 1, 2, 3, 4]] * 3  # k >= V keeps all


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])  # sorted: 0.5, 0.2, 0.15, 0.1, 0.05
    logits = probs.log().repeat(5, 1)
    out = top_p_filter(logits, torch.tensor([0.45, 0.6, 0.8, 0.9, 1.0]))
    assert kept(out) == [
        [1],  # 0.5 >= 0.45 already
        [1, 3],  # 0.5 < 0.6, 0.7 >= 0.6
        [1, 3, 4],  # 0.7 < 0.8, 0.85 >= 0.8
        [1, 2, 3, 4],  # 0.85 < 0.9, 0.95 >= 0.9
        [0, 1, 2, 3, 4],  # 1.0 is off
    ]


def test_top_p_ties_keep_just_enough_tokens():
    logits = torch.zeros(1, 4)  # four tokens of 0.25
    assert kept(top_p_filter(logits, 0.5)) == [[0, 1]]
    assert kept(top_p_filter(logits, 0.51)) == [[0, 1, 2]]
    assert kept(top_p_filter(logits, 0.01)) == [[0]]


def test_top_p_matches_the_sorting_definition_on_random_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3000, generator=g) * torch.linspace(0.2, 6, 64).unsqueeze(1)
    logits[::7, :1500] = -INF  # rows already filtered by top-k
    p = torch.rand(64, generator=g) * 0.98 + 0.01
    out = top_p_filter(logits, p)
    probs = logits.double().softmax(-1)
    s, i = probs.sort(-1, descending=True)
    before = s.cumsum(-1) - s  # mass of the tokens ranked above
    ref = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, i, before < p.double().unsqueeze(1))
    assert torch.equal(out > -INF, ref)


def test_min_p_is_relative_to_the_best_token():
    logits = torch.tensor([[0.5, 0.3, 0.12, 0.08]]).log().repeat(2, 1)
    out = min_p_filter(logits, torch.tensor([0.2, 0.7]))
    assert kept(out) == [[0, 1, 2], [0]]  # thresholds 0.1 and 0.35


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.25]]


def test_presence_and_frequency_penalties():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    counts = torch.tensor([[0, 1, 3]])
    out = apply_presence_frequency_penalty(logits, counts, 0.5, 0.1)
    assert out[0].tolist() == pytest.approx([1.0, 0.4, 0.2])


def test_temperature_scales_and_zero_means_unchanged():
    logits = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    # (logits - row max) / t: the softmax of logits / t, without overflow.
    assert apply_temperature(logits, torch.tensor([0.5, 0.0])).tolist() == [[-2.0, 0.0], [1.0, 2.0]]
    assert apply_temperature(logits, 0.5).tolist() == [[-2.0, 0.0], [-2.0, 0.0]]


def test_sampling_inverts_the_cdf_and_never_picks_removed_tokens():
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().repeat(4, 1)  # CDF 0.1, 0.3, 0.6, 1.0
    assert sample_from_logits(logits, torch.tensor([0.05, 0.15, 0.31, 0.65])).tolist() == [0, 1, 2, 3]
    masked = torch.tensor([[-INF, 0.0, -INF, 0.0]])
    assert sample_from_logits(masked, torch.tensor([0.0])).tolist() == [1]
    assert sample_from_logits(masked, torch.tensor([0.999999])).tolist() == [3]
    # Frequencies follow the softmax.
    u = torch.rand(40000, generator=torch.Generator().manual_seed(1))
    picks = sample_from_logits(logits[:1].expand(40000, 4), u)
    freq = torch.bincount(picks, minlength=4).double() / 40000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.double), atol=0.01)


def test_stop_string_helpers():
    assert find_stop("hello world", ["o w", "xyz"]) == 4
    assert find_stop("abcSTOPdefSTOP", ["STOP"], start=5) == 3  # a match ending after `start` counts
    assert find_stop("abc", ["d"]) == -1
    assert stop_holdback("hello wo", ["world"]) == 2
    assert stop_holdback("hello", ["lo!", "o!!"]) == 2
    assert stop_holdback("hello", ["xyz"]) == 0


def test_decode_delta_waits_for_complete_characters(tiny):
    _, tok = tiny
    ids = tok("héllo ✓", add_special_tokens=False)["input_ids"]
    text, prefix, read, pieces = "", 0, 0, []
    for n in range(1, len(ids) + 1):
        delta, prefix, read = decode_delta(tok, ids[:n], prefix, read)
        assert "\ufffd" not in delta
        pieces.append(delta)
        text += delta
    assert text == "héllo ✓"


# --------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("bad, field", [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": float("inf")}, "presence_penalty"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"stop": ["x"] * 17}, "stop"), ({"stop": [""]}, "stop"), ({"n": 0}, "n"), ({"seed": -1}, "seed"),
    ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens"), ({"stop_token_ids": [-3]}, "stop_token_ids"),
])
def test_sampling_params_reject_bad_values_naming_the_field(bad, field):
    with pytest.raises(LmforgeError, match=field):
        validate(SamplingParams, bad)


def test_sampling_options_from_the_command_line():
    p = sampling_params(["top_k=5", 'stop=["###", "\\n"]'], temperature=0.0, top_p=None)
    assert (p.temperature, p.top_p, p.top_k, p.stop) == (0.0, 0.9, 5, ["###", "\n"])
    with pytest.raises(LmforgeError, match="did you mean top_p"):
        sampling_params(["topp=0.5"])


def test_defaults_follow_common_practice():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.n) == (0.7, 0.9, 0, 1)
    assert all(f.description for f in SamplingParams.model_fields.values())


def test_prompt_plus_max_tokens_beyond_the_context_is_refused(tiny):
    model, tok = tiny
    engine = Engine(model, tok)
    with pytest.raises(LmforgeError, match=r"prompt 2 has 3 tokens and max_new_tokens is 126.*at most 125"):
        engine.add([5, 6, 7], SamplingParams(max_new_tokens=126), where="prompt 2")
    with pytest.raises(LmforgeError, match="is empty"):
        engine.add([], SamplingParams())
    with pytest.raises(LmforgeError, match="outside the model's vocabulary"):
        engine.add([10**6], SamplingParams())


# --------------------------------------------------------------------------------------------
# The engine


def greedy_reference(model, ids: list[int], steps: int, *, penalty: float = 1.0) -> list[int]:
    """Greedy decoding by full forward passes (no cache, no batching), with a repetition penalty."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out])).logits[0, -1].unsqueeze(0)
        if penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, ids + out] = True
            logits = apply_repetition_penalty(logits, seen, penalty)
        out.append(int(logits.argmax()))
    return out


def test_temperature_zero_is_argmax_at_every_step(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[1])["input_ids"]
    got = generate(model, tok, [ids], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[]))[0]
    ref = greedy_reference(model, ids, 12)
    eos = tok.eos_token_id
    cut = ref.index(eos) + 1 if eos in ref else 12
    assert got.token_ids == ref[:cut]


def test_greedy_matches_transformers_generate(tiny):
    model, tok = tiny
    params = SamplingParams(temperature=0, max_new_tokens=16)
    for prompt in PROMPTS[:3]:
        enc = tok(prompt, return_tensors="pt")
        ref = model.generate(**enc, do_sample=False, max_new_tokens=16, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, enc.input_ids.shape[1]:].tolist()
        assert generate(model, tok, [prompt], params)[0].token_ids == ref


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    model, tok = tiny
    params = SamplingParams(temperature=0, max_new_tokens=20)
    single = [generate(model, tok, [p], params)[0] for p in PROMPTS]
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) > 2  # really different lengths
    batched = generate(model, tok, PROMPTS, params)
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert [b.text for b in batched] == [s.text for s in single]
    # Rows joining a running batch (continuous batching) and leaving it change nothing either.
    rolling = generate(model, tok, PROMPTS, params, max_batch=2)
    assert [r.token_ids for r in rolling] == [s.token_ids for s in single]


def test_mixed_parameters_in_one_batch_do_not_leak(tiny):
    model, tok = tiny
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    alone = generate(model, tok, [PROMPTS[0]], greedy)[0].token_ids
    engine = Engine(model, tok)
    (row,) = engine.add(tok(PROMPTS[0])["input_ids"], greedy)
    engine.add(tok(PROMPTS[1])["input_ids"], SamplingParams(temperature=1.5, top_k=5, repetition_penalty=1.3,
                                                              frequency_penalty=1.0, max_new_tokens=10, n=3))
    while engine.has_work():
        engine.step()
    assert row.token_ids == alone


def run_engine(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list:
    rows = [r for i, p in enumerate(prompts) for r in engine.add(p, params, seed_stream=i * params.n)]
    while engine.has_work():
        engine.step()
    return rows


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_fast_decode_step_equals_the_transformers_forward(kind, tiny):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, tok = tiny
    cfg = AutoConfig.for_model(kind, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               tie_word_embeddings=False, sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(temperature=1.0, max_new_tokens=20, min_new_tokens=20, seed=0, logprobs=True)
    fast, plain = Engine(model, tok, max_batch=2), Engine(model, tok, max_batch=2, fast_decode=False)
    assert fast.fast is not None and plain.fast is None
    a, b = run_engine(fast, prompts, params), run_engine(plain, prompts, params)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(len(r.token_ids) == 20 for r in a)  # padding, joining and leaving were all exercised
    assert torch.allclose(torch.tensor([r.logprobs for r in a]), torch.tensor([r.logprobs for r in b]), atol=1e-5)


def test_fast_decode_steps_aside_for_wrapped_models(tiny):
    model, tok = tiny
    assert Engine(model, tok).fast is not None
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    try:
        assert Engine(model, tok).fast is None  # a hook must run, so the model's own forward is used
    finally:
        handle.remove()


def test_rows_never_exceed_max_batch_and_all_prompts_finish(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=3)
    params = SamplingParams(temperature=0.9, max_new_tokens=6, min_new_tokens=6, n=2, seed=1)
    rows = [r for p in PROMPTS[:3] for r in engine.add(tok(p)["input_ids"], params)]
    widths = []
    while engine.has_work():
        engine.step()
        widths.append(len(engine.rows))
    assert max(widths) == 2  # a group of n=2 never joins 2 running rows under max_batch=3
    assert [len(r.token_ids) for r in rows] == [6] * 6


def test_repetition_penalty_in_the_engine_matches_its_definition(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[2])["input_ids"]
    got = generate(model, tok, [ids], SamplingParams(temperature=0, repetition_penalty=1.8, max_new_tokens=10))[0]
    ref = greedy_reference(model, ids, 10, penalty=1.8)
    assert got.token_ids == ref[: len(got.token_ids)]
    assert got.token_ids != greedy_reference(model, ids, 10)[: len(got.token_ids)]  # the penalty did something


def test_max_new_tokens_and_stop_token_ids(tiny):
    model, tok = tiny
    p = SamplingParams(temperature=0, max_new_tokens=7)
    out = generate(model, tok, [PROMPTS[1]], p)[0]
    assert (len(out.token_ids), out.finish_reason) == (7, "length")
    first = out.token_ids[0]
    stopped = generate(model, tok, [PROMPTS[1]], p.model_copy(update={"stop_token_ids": [first]}))[0]
    assert (stopped.token_ids, stopped.finish_reason, stopped.text) == ([first], "stop", "")
    # min_new_tokens forbids the stop token until 3 tokens exist.
    later = generate(model, tok, [PROMPTS[1]], p.model_copy(update={"stop_token_ids": [first], "min_new_tokens": 3}))[0]
    assert len(later.token_ids) >= 3 and first not in later.token_ids[:3]


def test_stop_strings_cut_exactly_at_the_stop_and_streams_hold_it_back(tiny):
    model, tok = tiny
    base = SamplingParams(temperature=0, max_new_tokens=30, skip_special_tokens=True)
    full = generate(model, tok, [PROMPTS[3]], base)[0].text
    printable = [i for i in range(len(full) - 3) if full[i:i + 3].isprintable() and "\ufffd" not in full[i:i + 3]]
    assert printable, full
    stop = full[printable[len(printable) // 2]: printable[len(printable) // 2] + 3]
    params = base.model_copy(update={"stop": [stop]})
    out = generate(model, tok, [PROMPTS[3]], params)[0]
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop"
    chunks = list(stream(model, tok, PROMPTS[3], params))
    assert "".join(c.text for c in chunks) == out.text
    assert chunks[-1].finish_reason == "stop"
    assert sum(len(c.token_ids) for c in chunks) == len(out.token_ids)


def test_streaming_concatenates_to_the_batch_result(tiny):
    model, tok = tiny
    params = SamplingParams(temperature=1.0, top_p=0.8, max_new_tokens=25, seed=3)
    whole = generate(model, tok, [PROMPTS[0]], params)[0]
    chunks = list(stream(model, tok, PROMPTS[0], params))
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids


def test_seeded_sampling_is_reproducible_and_independent_of_batching(tiny):
    model, tok = tiny
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, n=3, seed=11)
    a = generate(model, tok, PROMPTS, params)
    b = generate(model, tok, PROMPTS, params, max_batch=4)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert [(x.prompt_index, x.sample_index) for x in a] == [(i, j) for i in range(5) for j in range(3)]
    assert len({tuple(x.token_ids) for x in a[:3]}) > 1  # the n samples differ
    c = generate(model, tok, PROMPTS, params.model_copy(update={"seed": 12}))
    assert [x.token_ids for x in a] != [z.token_ids for z in c]


def test_logprobs_are_under_the_sampling_distribution(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[1])["input_ids"]
    params = SamplingParams(temperature=0.8, top_p=0.7, max_new_tokens=6, seed=0, logprobs=True, stop_token_ids=[])
    out = generate(model, tok, [ids], params)[0]
    assert len(out.logprobs) == len(out.token_ids)
    for t, (tok_id, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out.token_ids[:t]])).logits[:, -1].float()
        ref = top_p_filter(logits / 0.8, 0.7).log_softmax(-1)[0, tok_id]
        assert lp == pytest.approx(float(ref), abs=1e-4)
    # top_k = 1 is a point mass: every sampled token has log-probability 0.
    one = generate(model, tok, [ids], params.model_copy(update={"top_k": 1}))[0]
    assert one.logprobs == pytest.approx([0.0] * len(one.token_ids))


# --------------------------------------------------------------------------------------------
# Models and files


def test_loads_a_stage_folder_and_a_peft_adapter(tiny_model_dir, tmp_path, tiny):
    from peft import LoraConfig, get_peft_model

    stage = tmp_path / "sft"
    (stage / "model").mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (stage / "model" / f.name).write_bytes(f.read_bytes())
    (stage / "manifest.json").write_text(json.dumps({"status": "complete", "artifact": "model"}))
    model, tok = load_model_for_inference(stage, device="cpu")
    assert generate(model, tok, PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=5))[0].token_ids == \
        generate(*tiny, PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=5))[0].token_ids

    base, _ = load_model_for_inference(tiny_model_dir, device="cpu")
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(str(tmp_path / "adapter"))
    merged, _ = load_model_for_inference(tmp_path / "adapter", device="cpu")
    x = torch.tensor([tok("Hello there")["input_ids"]])
    with torch.no_grad():
        want, got, plain = peft(x).logits, merged(x).logits, tiny[0](x).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-2)  # the adapter is really applied


def test_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        load_model_for_inference(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="no config.json"):
        load_model_for_inference(tmp_path / "empty")


def test_generate_file_writes_one_line_per_completion(tiny_model_dir, tmp_path, tiny):
    from lmforge.data.chat import render

    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"prompt": "Hello", "id": "a"}) + "\n\n"
                   + json.dumps({"messages": [{"role": "user", "content": "What is two plus two?"}]}) + "\n")
    params = SamplingParams(temperature=0, max_new_tokens=6, n=2)
    s = generate_file(tiny_model_dir, src, None, params, device="cpu")
    assert (s["prompts"], s["completions"], s["skipped_blank_lines"]) == (2, 4, 1)
    lines = [json.loads(x) for x in (tmp_path / "prompts.completions.jsonl").read_text().splitlines()]
    assert [(x["index"], x["sample"]) for x in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert lines[0]["id"] == "a" and lines[0]["prompt"] == "Hello"
    model, tok = tiny
    chat_ids = tok(render(tok, lines[2]["prompt"], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    ref = generate(model, tok, [chat_ids], params)[0]
    assert (lines[2]["completion"], lines[2]["prompt_tokens"], lines[2]["completion_tokens"]) == \
        (ref.text, len(chat_ids), len(ref.token_ids))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(LmforgeError, match="Line 2 of .*bad.jsonl has neither"):
        generate_file(tiny_model_dir, bad, None, params, device="cpu")


def test_cli_help_lists_every_sampling_parameter():
    from lmforge.cli import SAMPLING_HELP

    assert all(name in SAMPLING_HELP for name in SamplingParams.model_fields)


def test_generation_stops_at_the_chat_templates_end_of_turn_token(tiny):
    """A model fine-tuned with a reused template (ChatML) ends replies with <|im_end|>, not EOS."""
    import copy

    from lmforge.generation import eos_token_ids
    from lmforge.models import add_stop_token

    model, tok = tiny
    assert eos_token_ids(model, tok) >= {tok.eos_token_id}  # lmforge's template ends turns with EOS
    chatml = copy.deepcopy(tok)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                            "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                            "{% endif %}")
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert im_end != chatml.eos_token_id and {im_end, chatml.eos_token_id} <= eos_token_ids(model, chatml)
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert im_end not in eos_token_ids(model, plain)
    # SFT writes it into the saved generation config, for plain transformers' generate too.
    m2 = copy.deepcopy(model)
    before = m2.generation_config.eos_token_id
    add_stop_token(m2, im_end)
    add_stop_token(m2, im_end)  # idempotent
    after = m2.generation_config.eos_token_id
    assert (after if isinstance(after, list) else [after]) == ([before] if isinstance(before, int) else list(before or [])) + [im_end]

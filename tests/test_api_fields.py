"""What OpenAI clients send is served or refused with a 400 naming the field, never silently ignored."""

from __future__ import annotations

import openai
import pytest
import torch
from live import LiveServer

from kvcake.config import KvcakeConfig
from kvcake.requests import GenerateRequest, RequestMetrics
from kvcake.model import SamplingParams
from kvcake.reuse import drain

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("field", "extra"),
    [
        ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
        ("tool_choice", {"tool_choice": "auto"}),
        ("response_format", {"response_format": {"type": "xml"}}),
        ("top_logprobs", {"top_logprobs": 2}),
        ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("logit_bias", {"logit_bias": {"5": 150}}),
        ("logit_bias", {"logit_bias": {"99999": 1}}),
        ("logit_bias", {"logit_bias": {"tok": 1}}),
        ("n", {"n": 17}),
    ],
)
def test_unsupported_chat_fields_are_a_400_naming_them(live: LiveServer, config: KvcakeConfig, field: str, extra: dict) -> None:
    with pytest.raises(openai.BadRequestError, match=field):
        live.client().chat.completions.create(model=config.model, messages=MESSAGES, max_tokens=2, **extra)


@pytest.mark.parametrize(
    ("field", "extra"), [("logprobs", {"logprobs": 6}), ("best_of", {"best_of": 3}), ("suffix", {"suffix": "x"})]
)
def test_unsupported_completion_fields_are_a_400_naming_them(live: LiveServer, config: KvcakeConfig, field: str, extra: dict) -> None:
    with pytest.raises(openai.BadRequestError, match=field):
        live.client().completions.create(model=config.model, prompt="hi", max_tokens=2, **extra)


def test_an_unknown_field_is_named(live: LiveServer, config: KvcakeConfig) -> None:
    with pytest.raises(openai.BadRequestError, match="temprature: kvcake does not support this field"):
        live.client().chat.completions.create(model=config.model, messages=MESSAGES, extra_body={"temprature": 0})


def test_neutral_values_and_harmless_fields_are_served(live: LiveServer, config: KvcakeConfig) -> None:
    reply = live.client().chat.completions.create(
        model=config.model, messages=[{"role": "user", "content": "hi", "name": "ann"}], max_tokens=2, temperature=0,
        presence_penalty=0, frequency_penalty=None, logprobs=None, user="ann", response_format={"type": "text"},
    )
    assert reply.usage.completion_tokens >= 1
    streamed = list(live.client().chat.completions.create(
        model=config.model, messages=MESSAGES, max_tokens=2, stream=True, stream_options={"include_usage": True}
    ))
    assert streamed[-1].usage.completion_tokens >= 1


def test_a_model_can_be_retrieved_by_name(live: LiveServer, config: KvcakeConfig) -> None:
    assert live.client().models.retrieve(config.model).id == config.model
    with pytest.raises(openai.NotFoundError, match="not served here"):
        live.client().models.retrieve("gpt-0")


def test_logit_bias_forces_a_token(live: LiveServer, config: KvcakeConfig) -> None:
    forced = 77
    reply = live.client().completions.create(model=config.model, prompt="hi", max_tokens=5, temperature=0, logit_bias={str(forced): 100})
    assert reply.choices[0].text == live.engine.tokenizer.decode([forced] * 5)
    assert all(token == forced for token in _tokens(live, "hi", 5, logit_bias=((forced, 100.0),)))


def test_ignore_eos_generates_max_tokens_past_the_stop_token(live: LiveServer, config: KvcakeConfig) -> None:
    eos = min(live.engine.tokenizer.stop_ids)
    forced = {str(eos): 100}
    stopped = live.client().completions.create(model=config.model, prompt="hi", max_tokens=5, temperature=0, logit_bias=forced)
    assert (stopped.usage.completion_tokens, stopped.choices[0].finish_reason) == (1, "stop")
    going_on = live.client().completions.create(model=config.model, prompt="hi", max_tokens=5, temperature=0, logit_bias=forced,
                                                extra_body={"ignore_eos": True})
    assert (going_on.usage.completion_tokens, going_on.choices[0].finish_reason) == (5, "length")


def test_a_frequency_penalty_stops_a_greedy_repeat(live: LiveServer) -> None:
    plain = _tokens(live, "make make make", 12)
    assert len(set(plain)) < len(plain), "the tiny model repeats itself greedily"
    penalised = _tokens(live, "make make make", 12, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised != plain and len(set(penalised)) > len(set(plain))


def _tokens(live: LiveServer, prompt: str, count: int, **sampling: object) -> list[int]:
    params = SamplingParams(max_tokens=count, **sampling)  # type: ignore[arg-type]
    return live.engine.generate(GenerateRequest(prompt=prompt, chat=False, sampling=params)).token_ids


def _engine_logprobs(live: LiveServer, prompt: str, count: int) -> tuple[list[int], list[torch.Tensor]]:
    result = live.engine.stream(GenerateRequest(prompt=prompt, chat=False, sampling=SamplingParams(max_tokens=count)), RequestMetrics())
    steps = list(result)
    return [s.token_id for s in steps], [torch.log_softmax(s.logits.float(), dim=-1) for s in steps]


def test_completion_logprobs_are_a_log_softmax_of_the_engine_logits(live: LiveServer, config: KvcakeConfig) -> None:
    ids, logprobs = _engine_logprobs(live, "Rivers", 5)
    reply = live.client().completions.create(model=config.model, prompt="Rivers", max_tokens=5, temperature=0, logprobs=2)
    got = reply.choices[0].logprobs
    assert len(got.token_logprobs) == len(ids) == 5
    for token, expected, value, top in zip(ids, logprobs, got.token_logprobs, got.top_logprobs):
        assert value == pytest.approx(float(expected[token]), abs=1e-5)
        assert max(top.values()) == pytest.approx(float(expected.max()), abs=1e-5)  # alternatives may share a text
    assert got.tokens[0] == live.engine.tokenizer.decode([ids[0]])
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]
    streamed = list(live.client().completions.create(model=config.model, prompt="Rivers", max_tokens=5, temperature=0, logprobs=0, stream=True))
    values = [v for c in streamed if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert values == pytest.approx(got.token_logprobs, abs=1e-6)


def test_chat_logprobs_come_in_openais_shape_streamed_too(live: LiveServer, config: KvcakeConfig) -> None:
    reply = live.client().chat.completions.create(model=config.model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-6 for entry in content)
    streamed = list(live.client().chat.completions.create(
        model=config.model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, stream=True
    ))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=1e-6)
    assert live.client().chat.completions.create(model=config.model, messages=MESSAGES, max_tokens=2).choices[0].logprobs is None


def test_n_choices_share_one_prefill_and_sample_with_derived_seeds(live: LiveServer, config: KvcakeConfig) -> None:
    prompt = list(range(3, 3 + 2 * config.chunk_size + 5))
    client = live.client()
    single_replies = [client.completions.create(model=config.model, prompt=prompt, max_tokens=6, temperature=1.0, seed=40 + i) for i in range(3)]
    singles = [r.choices[0].text for r in single_replies]
    live.engine.flush()
    reply = client.completions.create(model=config.model, prompt=prompt, max_tokens=6, temperature=1.0, seed=40, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == singles, "choice i samples with seed + i"
    assert reply.usage.completion_tokens == sum(r.usage.completion_tokens for r in single_replies)
    assert reply.model_extra["kvcake"]["prefix_hit_chunks"] == 2, "the stored prefix is reused, once for all choices"
    assert reply.model_extra["kvcake"]["prompt_tokens"] == len(prompt) == reply.usage.prompt_tokens
    streamed = list(client.completions.create(model=config.model, prompt=prompt, max_tokens=6, temperature=1.0, seed=40, n=3, stream=True))
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == singles


def test_n_choices_with_a_stop_sequence_stop_each_on_its_own(live: LiveServer, config: KvcakeConfig) -> None:
    client = live.client()
    messages = [{"role": "user", "content": "Tell me about rivers"}]
    free = client.chat.completions.create(model=config.model, messages=messages, max_tokens=10, temperature=0).choices[0].message.content
    stop = free[3:5]
    reply = client.chat.completions.create(model=config.model, messages=messages, max_tokens=10, temperature=0, n=2, stop=[stop])
    assert [c.message.content for c in reply.choices] == [free[: free.index(stop)]] * 2
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]


def test_several_prompts_give_choices_in_prompt_order(live: LiveServer, config: KvcakeConfig) -> None:
    client = live.client()
    prompts = ["Rivers", "The quick brown"]
    alone = [client.completions.create(model=config.model, prompt=p, max_tokens=5, temperature=0) for p in prompts]
    together = client.completions.create(model=config.model, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in together.choices] == [0, 1, 2, 3]
    assert [c.text for c in together.choices] == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert [a["prompt_tokens"] for a in together.model_extra["kvcake"]] == [a.usage.prompt_tokens for a in alone]
    streamed = list(client.completions.create(model=config.model, prompt=prompts, max_tokens=5, temperature=0, stream=True))
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [a.choices[0].text for a in alone]
    with pytest.raises(openai.BadRequestError, match="prompts"):
        client.completions.create(model=config.model, prompt=["x"] * 17, max_tokens=1)


SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["blue", "red"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["colour", "count"],
    "additionalProperties": False,
}


def test_json_schema_output_parses_and_fits_the_schema(live: LiveServer, config: KvcakeConfig) -> None:
    import json

    for seed in range(3):
        reply = live.client().chat.completions.create(
            model=config.model, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
        )
        value = json.loads(reply.choices[0].message.content)
        assert set(value) == {"colour", "count"} and value["colour"] in ("blue", "red") and 0 <= value["count"] <= 9
        assert reply.choices[0].finish_reason == "stop"


def test_json_object_output_is_an_object(live: LiveServer, config: KvcakeConfig) -> None:
    import json

    reply = live.client().chat.completions.create(
        model=config.model, messages=MESSAGES, max_tokens=200, temperature=0, response_format={"type": "json_object"},
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].message.content.startswith("{")


def test_a_schema_that_does_not_compile_is_a_400(live: LiveServer, config: KvcakeConfig) -> None:
    with pytest.raises(openai.BadRequestError, match="response_format"):
        live.client().chat.completions.create(
            model=config.model, messages=MESSAGES, max_tokens=2,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}},
        )


def test_echo_returns_the_prompt_before_each_completion(live: LiveServer, config: KvcakeConfig) -> None:
    client = live.client()
    plain = client.completions.create(model=config.model, prompt="Rivers", max_tokens=4, temperature=0).choices[0].text
    echoed = client.completions.create(model=config.model, prompt="Rivers", max_tokens=4, temperature=0, echo=True, n=2)
    assert [c.text for c in echoed.choices] == ["Rivers" + plain] * 2
    ids = [5, 6, 7]
    by_ids = client.completions.create(model=config.model, prompt=ids, max_tokens=2, temperature=0, echo=True).choices[0].text
    assert by_ids.startswith(live.engine.tokenizer.decode(ids))
    streamed = list(client.completions.create(model=config.model, prompt="Rivers", max_tokens=4, temperature=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "Rivers" + plain


def test_echo_with_logprobs_scores_the_prompt_too(live: LiveServer, config: KvcakeConfig) -> None:
    prompt = "The quick brown fox"
    reply = live.client().completions.create(model=config.model, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1)
    got = reply.choices[0].logprobs
    ids = live.engine.tokenizer.encode(prompt)
    rows = drain(live.engine.prompt_logprobs(ids))
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    expected = [float(row[token]) for row, token in zip(rows, ids[1:])]
    assert got.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-5)
    assert len(got.token_logprobs) == len(ids) + reply.usage.completion_tokens
    assert reply.choices[0].text.startswith(prompt)

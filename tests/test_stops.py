"""Stop sequences: matched across token boundaries, not returned, finish_reason "stop", streamed with minimal hold-back."""

from __future__ import annotations

import openai
import pytest
from live import LiveServer

from kvcake.config import KvcakeConfig
from kvcake.server.stops import StopMatcher


def test_a_stop_sequence_split_over_pieces_is_found_and_not_released() -> None:
    matcher = StopMatcher(("END",))
    assert matcher.feed("abc E") == ("abc ", False)  # "E" may start "END": held back
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("Dxyz") == ("", True)


def test_text_that_cannot_start_a_match_is_released_at_once() -> None:
    matcher = StopMatcher(("\n\n", "STOP"))
    assert matcher.feed("hello") == ("hello", False)
    assert matcher.feed(" wor\n") == (" wor", False)
    assert matcher.feed("x") == ("\nx", False)
    assert matcher.feed("ST") == ("", False)
    assert matcher.flush() == "ST"


def test_the_earliest_of_several_matches_wins() -> None:
    assert StopMatcher(("b", "a")).feed("xxab") == ("xx", True)


def _free_text(live: LiveServer, config: KvcakeConfig, prompt: str, max_tokens: int = 24) -> str:
    return live.client().completions.create(model=config.model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def test_the_server_stops_at_a_sequence_across_token_boundaries(live: LiveServer, config: KvcakeConfig) -> None:
    text = _free_text(live, config, "The quick brown")
    engine = live.engine
    ids = engine.tokenizer.encode(text)
    assert len(ids) >= 4, "the tiny model's answer is long enough to cut"
    cut = len(engine.tokenizer.decode(ids[:2]))
    stop = text[cut - 1 : cut + 2]  # straddles the second and third tokens
    assert len(stop) == 3 and stop in text
    expected = text[: text.index(stop)]
    client = live.client()
    reply = client.completions.create(model=config.model, prompt="The quick brown", max_tokens=24, temperature=0, stop=[stop])
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=config.model, prompt="The quick brown", max_tokens=24, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model=config.model, messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0)
    content = chat.choices[0].message.content
    if len(content) > 3:
        stopped = client.chat.completions.create(model=config.model, messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0, stop=[content[2:4]])
        assert stopped.choices[0].message.content == content[: content.index(content[2:4])]


def test_a_stop_that_never_matches_changes_nothing(live: LiveServer, config: KvcakeConfig) -> None:
    text = _free_text(live, config, "Rivers")
    reply = live.client().completions.create(model=config.model, prompt="Rivers", max_tokens=24, temperature=0, stop=["\u2603never"])
    assert reply.choices[0].text == text


def test_a_stop_with_a_stored_prefix_still_reuses_it(live: LiveServer, config: KvcakeConfig) -> None:
    prompt = list(range(3, 3 + 3 * config.chunk_size + 5))
    first = live.client().completions.create(model=config.model, prompt=prompt, max_tokens=16, temperature=0)
    live.engine.flush()
    text = first.choices[0].text
    stop = text[3:5] if len(text) > 5 else "\u2603"
    again = live.client().completions.create(model=config.model, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert again.model_extra["kvcake"]["prefix_hit_chunks"] == 3
    assert again.choices[0].text == (text[: text.index(stop)] if stop in text else text)


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [""]])
def test_bad_stop_lists_are_refused(live: LiveServer, config: KvcakeConfig, stop: list[str]) -> None:
    with pytest.raises(openai.BadRequestError, match="stop"):
        live.client().completions.create(model=config.model, prompt="hi", stop=stop)

"""The real default model (SmolLM2-135M-Instruct from its PyPI package) end to end."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from kvcake.data import long_text
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest, RequestError, RequestMetrics
from kvcake.model import SamplingParams
from kvcake.model.segments import PromptLayout
from kvcake.reuse import ReuseChoice, Strategy, drain
from kvcake.server.worker import ComputeWorker, Event, Job, TokenEvent

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def engine(default_config) -> Engine:
    return Engine(default_config)


@pytest.fixture(scope="module")
def long_prompt(default_config, default_tokenizer) -> list[int]:
    ids = default_tokenizer.encode(long_text(default_config.cache_path(), 8000))
    assert len(ids) >= 1100
    return ids[:1100]


def test_logits_match_transformers_on_a_long_prompt(default_model, hf_default_model, long_prompt) -> None:
    ids = torch.tensor(long_prompt)
    with torch.no_grad():
        reference = hf_default_model(ids[None]).logits[0]
    ours = default_model.forward(ids, torch.arange(len(ids)), default_model.new_cache(len(ids)), all_logits=True).logits
    # float32 rounding only: oneDNN and the BLAS sum the products in other orders (measured 3.6e-6 of the largest logit)
    assert (ours - reference).abs().max().item() <= 5e-6 * reference.abs().max().item()


def test_chunked_prefill_matches_one_shot_on_the_real_model(engine, long_prompt) -> None:
    plan = engine.prefix.plan(PromptLayout.plain(long_prompt), ReuseChoice(engine.config.tenant, Strategy.parse("compute")))
    chunked = drain(engine.prefix.fill(plan, engine.model.new_cache(len(long_prompt)))).logits
    model = engine.model
    one_shot = model.forward(torch.tensor(long_prompt), torch.arange(len(long_prompt)), model.new_cache(len(long_prompt))).logits[-1]
    assert (chunked - one_shot).abs().max().item() <= 1e-4


def test_greedy_generation_equals_transformers_generate(engine, hf_default_model, long_prompt) -> None:
    prompt = long_prompt[:600]
    with torch.no_grad():
        reference = hf_default_model.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    ours = engine.generate(GenerateRequest(token_ids=prompt, sampling=SamplingParams(max_tokens=32)))
    stop = next((i + 1 for i, t in enumerate(reference) if t in engine.tokenizer.stop_ids), len(reference))
    assert ours.token_ids == reference[:stop]


def test_chat_prompt_answers_and_reports_ttft(engine) -> None:
    result = engine.generate(GenerateRequest(prompt="What is the capital of France?", sampling=SamplingParams(max_tokens=16)))
    assert "Paris" in result.text
    assert result.metrics.ttft_s > 0
    assert result.metrics.prompt_tokens > 0


def test_prompt_longer_than_the_context_is_refused(engine) -> None:
    too_long = [100] * engine.context_length
    with pytest.raises(RequestError, match="context is 8192"):
        engine.generate(GenerateRequest(token_ids=too_long))


def test_cli_generate_prints_text_and_ttft(default_config) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvcake.cli", "generate", "--prompt", "Say hello.", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "ttft=" in result.stderr


def test_gguf_file_of_a_registry_model_resolves_to_its_converted_folder(default_config, default_folder) -> None:
    from kvcake.model import resolve_model

    gguf = default_config.cache_path() / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model(str(gguf), default_config.cache_path()) == default_folder


def test_requests_served_together_give_what_they_give_alone_on_the_real_model(engine, long_prompt) -> None:
    """Continuous batching on the default model: three requests (one with a stored prefix, loaded by Cake)
    in one batch give the greedy tokens of each alone, logits within 1e-4 in float32."""
    requests = [
        GenerateRequest(token_ids=long_prompt[:300], reuse="cake", sampling=SamplingParams(max_tokens=12, temperature=0.0)),
        GenerateRequest(token_ids=long_prompt[300:420], reuse="compute", sampling=SamplingParams(max_tokens=16, temperature=0.0)),
        GenerateRequest(prompt="Name three rivers.", sampling=SamplingParams(max_tokens=10, temperature=0.0)),
    ]
    alone = [[(step.token_id, step.logits) for step in engine.stream(request, RequestMetrics())] for request in requests]
    engine.flush()
    worker = ComputeWorker(engine, max_queue=8, io_threads=0, on_finished=lambda metrics, cancelled: None, max_batch=3)
    served: list[list[tuple[int, torch.Tensor]]] = [[] for _ in requests]
    finished = [threading.Event() for _ in requests]

    def emit(index: int, event: Event) -> None:
        if isinstance(event, TokenEvent):
            served[index].append((event.step.token_id, event.step.logits))
        else:
            finished[index].set()

    for index, request in enumerate(requests):
        worker.submit(Job(request=request, planned=None, emit=lambda event, index=index: emit(index, event)))
    assert all(done.wait(300) for done in finished)
    worker.close()
    assert worker.decode_rows > worker.decode_steps, "some decode steps ran several requests at once"
    for together, reference in zip(served, alone):
        assert [token for token, _ in together] == [token for token, _ in reference]
        assert max((a - b).abs().max().item() for (_, a), (_, b) in zip(together, reference)) <= 1e-4


def test_a_token_computed_alone_gets_the_bits_it_has_inside_a_longer_pass(default_model, long_prompt) -> None:
    """A prompt's last token computed alone (after a prefix hit whose stored tail ends just before it) gives the full
    prefill's logits and K/V to the bit: with smollm2's 1536-wide MLP, one row's down projection takes another oneDNN
    path than several rows'."""
    ids = torch.tensor(long_prompt[:300])
    whole, alone_cache = default_model.new_cache(len(ids)), default_model.new_cache(len(ids))
    for cache, cuts in ((whole, [0, 256, 300]), (alone_cache, [0, 256, 299, 300])):
        for start, end in zip(cuts, cuts[1:]):
            out = default_model.forward(ids[start:end], torch.arange(start, end), cache)
        if cache is whole:
            in_pass = out.logits[-1]
    assert torch.equal(out.logits[-1], in_pass)
    for layer in range(default_model.config.num_layers):
        assert torch.equal(alone_cache.keys[layer][:, 299], whole.keys[layer][:, 299])
        assert torch.equal(alone_cache.values[layer][:, 299], whole.values[layer][:, 299])

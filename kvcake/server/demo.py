"""`kvcake demo`, the README's main job: KV reuse through the HTTP API.

It starts the server on 127.0.0.1 (default model, local disk store unless `store_url`
says otherwise), asks two questions about one long document with the official `openai`
client, and prints each answer with its TTFT and the `kvcake` accounting of the
response: the first request computes the document, the second loads its stored chunks
(Cake). The run uses its own tenant salt, so an earlier run's entries never make the
first request a hit, and it deletes its entries at the end.
"""

from __future__ import annotations

import sys
import uuid

import openai

from kvcake.config import KvcakeConfig
from kvcake.data import long_text
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest
from kvcake.runtime import in_fresh_thread
from kvcake.server.background import BackgroundServer
from kvcake.store import prefix_chunk_keys

QUESTIONS = (
    "In two sentences, what is the main argument of the essay above?",
    "Which examples does the essay above give?",
)


def run_demo(config: KvcakeConfig, document_chars: int) -> None:
    config = config.replace(tenant=f"demo-{uuid.uuid4().hex[:12]}")
    document = long_text(config.cache_path(), document_chars)
    conversations = [[{"role": "user", "content": f"{document}\n\n{question}"}] for question in QUESTIONS]
    engine = in_fresh_thread(lambda: Engine(config))  # the server's compute thread is the one that computes
    try:
        with BackgroundServer(engine) as server:
            print(f"[kvcake] serving {config.model} at {server.url}/v1, store {config.effective_store_url()}", file=sys.stderr)
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="demo", max_retries=0, timeout=3600)
            ttfts = []
            for messages in conversations:
                ttfts.append(_ask(client, config, messages, len(document)))
                engine.flush()  # stored before the next question asks for it, however busy the machine
        print(f"[kvcake] TTFT {ttfts[0]:.2f}s (computed) -> {ttfts[1]:.2f}s (reused): {ttfts[0] / ttfts[1]:.1f}x faster", file=sys.stderr)
    finally:
        _forget(engine, conversations)
        engine.close()


def _ask(client: openai.OpenAI, config: KvcakeConfig, messages: list[dict[str, str]], document_chars: int) -> float:
    question = messages[0]["content"].rsplit("\n\n", 1)[-1]
    print(f"\n[kvcake] question over a {document_chars}-character document: {question}", file=sys.stderr)
    reply = client.chat.completions.create(model=config.model, messages=messages, max_tokens=config.max_tokens, temperature=0)
    print(reply.choices[0].message.content)
    accounting = reply.model_extra["kvcake"]
    print(
        f"[kvcake] ttft={accounting['ttft_s']:.3f}s prompt_tokens={accounting['prompt_tokens']} reuse={accounting['reuse']} "
        f"stored_chunks_hit={accounting['prefix_hit_chunks']} computed={accounting['tokens_computed']} "
        f"loaded={accounting['tokens_loaded']} meet_chunk={accounting['meet_chunk']}",
        file=sys.stderr,
    )
    return accounting["ttft_s"]


def _forget(engine: Engine, conversations: list[list[dict[str, str]]]) -> None:
    """Delete the chunks this run stored (its tenant salt makes them unreachable anyway)."""
    engine.flush()
    for messages in conversations:
        ids = engine.plan_prompt(GenerateRequest(messages=messages)).token_ids
        for key in prefix_chunk_keys(engine.fingerprint, engine.config.tenant, ids, engine.config.chunk_size):
            engine.store.delete(key)

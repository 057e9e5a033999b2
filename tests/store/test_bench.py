from __future__ import annotations

import argparse
import json

from kvcake.bench import store as bench


def test_bench_store_writes_its_report(tmp_path, redis_server) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "store.md"
    args = parser.parse_args([
        "--chunk-tokens", "16", "--layers", "2", "--seconds", "0.01", "--gbps", "10", "--transfer-mb", "0.1",
        "--readers", "2", "--redis-url", redis_server.url, "--work-dir", str(tmp_path / "work"), "--out", str(out),
    ])
    bench.run(args)
    report = json.loads(out.with_suffix(".json").read_text())
    assert {row["tier"] for row in report["tiers"]} == {"memory", "file", "redis", "tiered"}
    assert len(report["codec"]) == 4 and len(report["throttle"]) == 5  # 1 rate, latency, file, redis, 2 readers
    assert "## Throttle" in out.read_text()

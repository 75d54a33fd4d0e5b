"""The `pact-cache` command on the tiny model: build, verify, inspect, stats,
merge, and recovery from `kill -9`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from pact.cache_tools import CacheReader, build_cache, load_manifest
from pact.cli.cache import main
from test_cache_support import (
    TINY_MAX_LENGTH, float32_cache, one_thread, subprocess_env, tiny, tiny_examples, tiny_safety, tiny_safety_file,
)


def _build_args(model_dir, safety_file, out, *extra):
    return ["build", "--model", str(model_dir), "--safety-tokens", str(safety_file), "--out", str(out), "--device", "cpu",
            "--max-length", str(TINY_MAX_LENGTH), "--limit", "12", "--rows-per-shard", "4", "--batch-size", "3", "--quiet", *extra]


def _shards(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.arrow"))}


@pytest.fixture(scope="module")
def cli_cache(tiny_model_dir, tiny_safety_file, tmp_path_factory):
    """A default-layout cache built by the CLI."""
    out = tmp_path_factory.mktemp("cli") / "cache"
    assert main(_build_args(tiny_model_dir, tiny_safety_file, out)) == 0
    return out


def test_build_prints_the_summary_and_records_everything(cli_cache, tiny, tiny_safety, capsys):
    manifest = load_manifest(cli_cache)
    assert manifest["complete"] and manifest["dtype"] == "int8" and manifest["top_k"] is None
    assert manifest["safety_tokens"]["ids"] == tiny_safety.ids and manifest["safety_tokens"]["tokens"] == tiny_safety.tokens
    assert manifest["fingerprints"]["model"] == tiny.fingerprint
    assert manifest["fingerprints"]["tokenizer"] == tiny.tokenizer_fingerprint
    assert manifest["fingerprints"]["data"].startswith("sha256:") and manifest["data"]["max_length"] == TINY_MAX_LENGTH
    assert manifest["gate"] == {"p0": 0.9, "gate_temperature": 1.0}
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 4]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in manifest["shards"])
    assert (cli_cache / "safety_tokens.json").is_file()


def test_verify_passes_then_names_a_corrupt_shard(cli_cache, tmp_path, capsys):
    assert main(["verify", str(cli_cache), "--recompute", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK") and "recomputed 3 row(s)" in out
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in cli_cache.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    shard = broken / "shard-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["verify", str(broken)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED") and "problem: shard-00002.arrow: sha256" in out


def test_inspect_and_stats(cli_cache, capsys):
    assert main(["inspect", str(cli_cache), "--row", "2"]) == 0
    text = capsys.readouterr().out
    assert "dtype int8" in text and "row 2 (example_id 2)" in text and "top safety tokens" in text
    assert main(["inspect", str(cli_cache), "--row", "-1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    steps = info["row"]["steps"]
    assert info["row"]["example_id"] == 11 and len(steps) == len(CacheReader(cli_cache)[-1]["post_count"])
    assert all(0 < s["prob"] <= 1 for step in steps for s in step["top_safety"])
    assert main(["stats", str(cli_cache), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["bytes_per_response_token"] == pytest.approx(stats["bytes"] / stats["response_tokens"])
    assert 0 < stats["entropy_full"]["mean"] <= stats["max_entropy"] + 1e-6
    assert sum(stats["column_bytes_per_response_token"].values()) == pytest.approx(stats["bytes_per_response_token"], rel=0.5)
    assert main(["stats", str(cli_cache)]) == 0
    assert "bytes per response token" in capsys.readouterr().out


def test_merge_joins_disjoint_caches_and_refuses_mismatches(tiny, tiny_examples, tiny_safety, float32_cache, tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    build_cache(tiny, tiny_examples[:5], tiny_safety, first, dtype="float32", rows_per_shard=4, progress=False)
    build_cache(tiny, tiny_examples[5:], tiny_safety, second, dtype="float32", rows_per_shard=3, progress=False)
    assert main(["merge", str(tmp_path / "merged"), str(first), str(second)]) == 0
    merged, whole = CacheReader(tmp_path / "merged"), CacheReader(float32_cache)
    assert len(merged) == len(whole) and len(merged.shards) == 2 + 3
    for a, b in zip(merged, whole):
        assert a["example_id"] == b["example_id"]
        assert (a["full_logits"] - b["full_logits"]).abs().max() < 1e-5
    assert main(["verify", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "dup"), str(first), str(first)]) == 2
    assert "hold the same examples" in capsys.readouterr().err
    other = tmp_path / "int8"
    build_cache(tiny, tiny_examples[5:], tiny_safety, other, rows_per_shard=4, progress=False)
    assert main(["merge", str(tmp_path / "mixed"), str(first), str(other)]) == 2
    assert "dtype: 'float32' vs 'int8'" in capsys.readouterr().err


def test_merge_renumbers_caches_of_different_data_files(tiny_model_dir, tiny_safety_file, tmp_path, capsys):
    """Two data files both number their rows from 0: merged, every row is there once, the second cache's ids follow the
    first's, and every value is unchanged."""
    from pact.data.sources import demo_data_path

    rows = [line for line in demo_data_path("benign").read_text(encoding="utf-8").splitlines() if line.strip()][:12]
    caches = []
    for name, part in (("first", rows[:5]), ("second", rows[5:])):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("\n".join(part) + "\n", encoding="utf-8")
        caches.append(tmp_path / name)
        assert main(_build_args(tiny_model_dir, tiny_safety_file, caches[-1], "--data", str(data), "--dtype", "float32")) == 0
    inputs = [row for cache in caches for row in CacheReader(cache)]
    assert [row["example_id"] for row in inputs] == [*range(5), *range(7)]
    out = tmp_path / "merged"
    assert main(["merge", str(out), *map(str, caches)]) == 0
    merged = list(CacheReader(out))
    assert [row["example_id"] for row in merged] == list(range(12))
    for got, want in zip(merged, inputs):
        for key, value in want.items():
            if key != "example_id":
                assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
    manifest = load_manifest(out)
    assert [source["example_id_offset"] for source in manifest["merged_from"]] == [0, 5]
    first, second = (load_manifest(cache)["shards"] for cache in caches)
    digests = [entry["sha256"] for entry in manifest["shards"]]
    assert digests[:2] == [e["sha256"] for e in first] and not set(digests[2:]) & {e["sha256"] for e in second}
    assert main(["verify", str(out)]) == 0


def test_kill_9_then_resume_equals_a_clean_build(tiny_model_dir, tiny_safety_file, tmp_path, capsys):
    out = tmp_path / "killed"
    # Slow the build down after each shard so the kill lands mid-build, between a shard and its manifest update.
    script = (
        "import sys, time\n"
        "import pact.cache_tools.builder as b\n"
        "real = b.write_shard\n"
        "def slow(*a, **k):\n"
        "    entry = real(*a, **k)\n"
        "    time.sleep(1.0)\n"
        "    return entry\n"
        "b.write_shard = slow\n"
        "from pact.cli.cache import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, *_build_args(tiny_model_dir, tiny_safety_file, out)],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "shard-00000.arrow").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the build never wrote a shard"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    interrupted = load_manifest(out, allow_incomplete=True)
    assert not interrupted["complete"] and len(interrupted["shards"]) < 3
    assert main(_build_args(tiny_model_dir, tiny_safety_file, out, "--resume")) == 0
    clean = tmp_path / "clean"
    assert main(_build_args(tiny_model_dir, tiny_safety_file, clean)) == 0
    assert _shards(out) == _shards(clean)
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created_at", "checksums")}  # noqa: E731
    assert strip(load_manifest(out)) == strip(load_manifest(clean))


def test_cli_errors_are_one_line(tiny_model_dir, tiny_safety_file, cli_cache, capsys):
    assert main(_build_args(tiny_model_dir, tiny_safety_file, cli_cache)) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err
    assert main(_build_args(tiny_model_dir, tiny_safety_file, cli_cache, "--resume", "--dtype", "float16")) == 2
    assert "dtype: 'int8' vs 'float16'" in capsys.readouterr().err
    assert main(["verify", str(cli_cache / "nowhere")]) == 2
    assert "not a pact cache" in capsys.readouterr().err


def test_help_explains_every_build_flag(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--safety-tokens", "--out", "--top-k", "--max-length", "--batch-size", "--rows-per-shard",
                 "--dtype", "--device", "--resume", "--overwrite", "--skip-invalid"):
        assert flag in text

"""Hostile inputs to `pact-cache` (build, verify, inspect, stats, merge) and to the cache format: see tests/hostile.py.

Exit codes: `verify` finding damage in a pact cache (an edited manifest, a bad
shard, an incomplete build) is a failed check, 1; every other command refusing
a damaged cache, and any command given something that is not a readable pact
cache at all, is bad input, 2.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from hostile import NEEDS_NON_ROOT, Case, check_case, read_only_folder
from pact.cache_tools import CacheReader, load_manifest
from pact.cli.cache import main
from pact.cache_tools.manifest import save_manifest
from pact.cache_tools.writer import DirectoryLock
from test_cache_support import TINY_MAX_LENGTH, downgrade, rewrite_response_spans, subprocess_env

FAMILY = "pact-cache"


# The settings of a build that runs to the end: 3 float32 shards of 4 rows, no progress bar.
SMALL = ("--max-length", str(TINY_MAX_LENGTH), "--rows-per-shard", "4", "--batch-size", "3", "--dtype", "float32", "--quiet")


def _teacher_with_another_template(w) -> None:
    """A copy of the tiny model whose tokenizer's chat template differs (another tokenizer fingerprint)."""
    shutil.copytree(w.model, w.path("teacher"))
    (w.path("teacher") / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")


def _build(w, out, *extra) -> list[str]:
    """`pact-cache build` of the world's data with its safety tokens on the tiny model into `out`, plus `extra` flags."""
    return ["build", "--model", str(w.model), "--safety-tokens", str(w.safety), "--data", str(w.data), "--out", str(out),
            "--device", "cpu", *extra]


def _edit(change, seal: bool = False):
    """A `prepare` applying `change(manifest)` to the world cache's manifest.json: by hand (its checksums left as they
    were), or `seal`ed with fresh checksums as pact-cache would write it (so only the other checks can catch it)."""
    def prepare(w):
        manifest = json.loads((w.cache / "manifest.json").read_text(encoding="utf-8"))
        change(manifest)
        if seal:
            save_manifest(w.cache, manifest)
        else:
            (w.cache / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return prepare


def _without_checksums(change):
    """`change` applied to a manifest as an older pact-cache wrote it: without checksums."""
    def apply(manifest):
        del manifest["checksums"]
        change(manifest)
    return apply


def _set(*keys_and_value):
    """A manifest change setting the field at `keys` (dict keys or list indices) to the last argument."""
    *keys, value = keys_and_value

    def change(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


def _shard_elsewhere(entry):
    """A sealed manifest whose first shard entry is `entry(world)` (relative to the cache, or absolute), where a real
    copy of that shard was placed: only the check of shard names can refuse it."""
    def prepare(w):
        destination = w.cache / entry(w)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes((w.cache / "shard-00000.arrow").read_bytes())
        _edit(_set("shards", 0, "file", entry(w)), seal=True)(w)
    return prepare


def _damage_shard(how: str):
    """A `prepare` damaging shard-00001.arrow of the world cache: truncated to 100 bytes, deleted, or swapped for shard 0's file."""
    def prepare(w):
        shard = w.cache / "shard-00001.arrow"
        if how == "truncate":
            shard.write_bytes(shard.read_bytes()[:100])
        elif how == "delete":
            shard.unlink()
        else:
            shard.write_bytes((w.cache / "shard-00000.arrow").read_bytes())
    return prepare


def _copy_cache(w):
    """A `prepare` copying the world cache to `copy` (a second input holding the very same examples)."""
    shutil.copytree(w.cache, w.path("copy"))


def _old_version_copy(w):
    """A `prepare` copying the world cache to `old` and rewriting the copy as a format-version-1 cache."""
    shutil.copytree(w.cache, w.path("old"))
    downgrade(w.path("old"), 1)


def _hold_lock(name: str):
    """A `prepare` holding the build lock of folder `name` (created if needed) from this process, through another open
    file description, as another process would; the lock lives as long as the world."""
    def prepare(w):
        w.path(name).mkdir(exist_ok=True)
        w.held_lock = DirectoryLock(w.path(name)).__enter__()
    return prepare


def _zero_safety_file_weights(w):
    """A `prepare` editing the cache's `safety_tokens.json`: every weight set to 0."""
    tokens = json.loads((w.cache / "safety_tokens.json").read_text(encoding="utf-8"))
    w.write("cache/safety_tokens.json", json.dumps({**tokens, "weights": [0.0] * len(tokens["weights"])}))


def _flag(flag: str, value: str, message: str) -> Case:
    """A build refused for one bad number, before any model is loaded: the message names the flag, then the setting."""
    return Case(f"build-{flag.strip('-')}-{value}", f"`{flag} {value}`", "pact-cache",
                lambda w: _build(w, w.path("out"), flag, value), 2, f"{flag}: {message}")


P0 = ("gate", "p0")
OUTSIDE = "../elsewhere/shard-00000.arrow"

CASES = [
    # --overwrite and --resume delete only what is provably a pact cache's own
    Case("build-overwrite-foreign-manifest", "`--overwrite` into a folder whose `manifest.json` is not a pact-cache manifest",
         "pact-cache", lambda w: _build(w, w.path("app"), "--overwrite"), 2, "also holds manifest.json",
         prepare=lambda w: w.write("app/manifest.json", '{"name": "my web app", "icons": []}')),
    Case("build-overwrite-foreign-tmp", "`--overwrite` into a folder holding someone's `.tmp-notes`", "pact-cache",
         lambda w: _build(w, w.path("work"), "--overwrite"), 2, "also holds .tmp-notes",
         prepare=lambda w: w.write("work/.tmp-notes", "draft")),
    Case("build-overwrite-cache-and-foreign", "`--overwrite` of a cache folder that also holds `notes.txt`", "pact-cache",
         lambda w: _build(w, w.cache, "--overwrite"), 2, "also holds notes.txt",
         prepare=lambda w: w.write("cache/notes.txt", "mine")),
    Case("build-overwrite-replaced-safety-tokens", "`--overwrite` of a cache whose `safety_tokens.json` is not the manifest's",
         "pact-cache", lambda w: _build(w, w.cache, "--overwrite"), 2, "also holds safety_tokens.json",
         prepare=lambda w: w.write("cache/safety_tokens.json", '{"ids": [1, 2]}')),
    Case("build-resume-foreign-shard", "`--resume` in a folder with no manifest and a `shard-00000.arrow` pact never wrote",
         "pact-cache", lambda w: _build(w, w.path("old"), "--resume"), 2, "also holds shard-00000.arrow",
         prepare=lambda w: w.write("old/shard-00000.arrow", b"my own arrow file")),
    Case("build-resume-edited-manifest", "`--resume` of a cache whose manifest was edited (gate p0)", "pact-cache",
         lambda w: _build(w, w.cache, "--resume"), 2, "field(s) gate.p0 do not match its checksums",
         prepare=_edit(_set(*P0, 0.5))),
    Case("build-locked", "a build into a folder another build is writing (its lock held)", "pact-cache",
         lambda w: _build(w, w.cache, "--resume"), 2, "is in use by another pact-cache build or merge: pid",
         prepare=_hold_lock("cache")),
    Case("build-foreign-lock-name", "`--overwrite` of a folder holding a user's file named `pact-cache.lock`", "pact-cache",
         lambda w: _build(w, w.path("mine"), "--overwrite"), 2, "is not a pact-cache lock file",
         prepare=lambda w: w.write("mine/pact-cache.lock", "my notes")),
    Case("build-model-tokenizer-torn", "`--model` a model folder whose tokenizer.json is cut short", "pact-cache",
         lambda w: ["build", "--model", str(w.path("damaged")), "--safety-tokens", str(w.safety), "--data", str(w.data),
                    "--out", str(w.path("out")), "--device", "cpu"], 2,
         "damaged: transformers cannot load this model folder (JSONDecodeError",
         prepare=lambda w: (shutil.copytree(w.model, w.path("damaged")), w.write("damaged/tokenizer.json", "{\"version\":"))),
    Case("build-out-is-a-file", "`--out` names an existing file", "pact-cache",
         lambda w: _build(w, w.data), 2, "data.jsonl is a file, not a directory"),
    Case("build-out-under-a-file", "`--out` is a path under a file", "pact-cache",
         lambda w: _build(w, w.path("data.jsonl/cache")), 2, "data.jsonl is a file, not a directory"),
    # numbers, refused by their settings class before anything is loaded
    _flag("--p0", "nan", "p0 must be a finite number > 0 and <= 1, got nan"),
    _flag("--p0", "0", "p0 must be a finite number > 0 and <= 1, got 0"),
    _flag("--p0", "1.5", "p0 must be a finite number > 0 and <= 1, got 1.5"),
    _flag("--gate-temperature", "0", "gate_temperature must be a finite number > 0, got 0"),
    _flag("--gate-temperature", "-1", "gate_temperature must be a finite number > 0, got -1"),
    _flag("--gate-temperature", "nan", "gate_temperature must be a finite number > 0, got nan"),
    _flag("--temperature", "0", "temperature must be a finite number > 0, got 0"),
    _flag("--temperature", "inf", "temperature must be a finite number > 0, got inf"),
    _flag("--top-k", "0", "top_k must be an integer >= 1, got 0"),
    _flag("--batch-size", "0", "batch_size must be an integer >= 1, got 0"),
    _flag("--rows-per-shard", "0", "rows_per_shard must be an integer >= 1, got 0"),
    _flag("--zstd-level", "0", "zstd_level must be an integer >= 1 and <= 22, got 0"),
    _flag("--zstd-level", "23", "zstd_level must be an integer >= 1 and <= 22, got 23"),
    _flag("--threads", "0", "threads must be an integer >= 1 and <= 1024, got 0"),
    _flag("--threads", "100000000000", "threads must be an integer >= 1 and <= 1024, got 100000000000"),
    _flag("--max-length", "0", "max_length must be an integer >= 1, got 0"),
    _flag("--limit", "0", "limit must be an integer >= 1, got 0"),
    Case("build-config-int-out", "`--config` YAML with an integer `out`", "pact-cache",
         lambda w: ["build", "--config", str(w.path("bad.yaml"))], 2,
         "bad.yaml: out: expected text or null, got 5 (an integer); quote it to make it text",
         prepare=lambda w: w.write("bad.yaml", "out: 5\n")),
    Case("build-batch-size-two", "`--batch-size two`", "pact-cache", lambda w: _build(w, w.path("out"), "--batch-size", "two"), 2,
         "argument --batch_size/--batch-size: invalid int value: 'two'"),
    # a manifest edited by hand: every field the trainer reads is under the checksums
    *[Case(f"verify-edited-{name}", f"manifest `{field}` edited by hand", "pact-cache", lambda w: ["verify", str(w.cache)], 1,
           f"field(s) {field} do not match its checksums", prepare=_edit(_set(*keys, value)))
      for name, field, keys, value in (
          ("p0", "gate.p0", P0, 0.5),
          ("gate-temperature", "gate.gate_temperature", ("gate", "gate_temperature"), 2.0),
          ("safety-weights", "safety_tokens.weights", ("safety_tokens", "weights", 0), 9.0),
          ("header-ids", "header_ids", ("header_ids",), [5, 6, 7]),
          ("stored-ids", "stored_ids", ("stored_ids",), [1, 2]),
          ("objective-temperature", "objective_temperature", ("objective_temperature",), 1.0),
          ("dtype", "dtype", ("dtype",), "int8"),
          ("shard-rows", "shards", ("shards", 0, "rows"), 5),
          ("total-rows", "totals.rows", ("totals", "rows"), 99),
          ("format-version", "format_version", ("format_version",), 1),
      )],
    Case("verify-edited-safety-tokens-file", "`safety_tokens.json` edited (no longer the manifest's)", "pact-cache",
         lambda w: ["verify", str(w.cache)], 1, "safety_tokens.json differs from the manifest's safety_tokens (field(s) weights)",
         prepare=_zero_safety_file_weights),
    Case("train-edited-manifest", "`pact train` on a cache whose manifest was edited (gate p0)", "pact",
         lambda w: ["train", "--cache", str(w.cache), "--out", str(w.path("trained")), "--model", str(w.model), "--device", "cpu",
                    "--max-steps", "1"], 2, "field(s) gate.p0 do not match its checksums", prepare=_edit(_set(*P0, 0.5))),
    Case("stats-edited-manifest", "`stats` on a cache whose manifest was edited", "pact-cache",
         lambda w: ["stats", str(w.cache)], 2, "the manifest was edited", prepare=_edit(_set("vocab_size", 10))),
    Case("merge-edited-manifest", "`merge` of a cache whose manifest was edited", "pact-cache",
         lambda w: ["merge", str(w.path("merged")), str(w.cache)], 2, "field(s) gate.p0 do not match its checksums",
         prepare=_edit(_set(*P0, 0.5))),
    # manifests of an older pact-cache (no checksums): the other checks still name the field or shard
    Case("verify-old-manifest-bad-dtype", "an old manifest (no checksums) with `dtype` edited to `int9`", "pact-cache",
         lambda w: ["verify", str(w.cache)], 1, "dtype 'int9' is not one of float32, bfloat16, float16, int8",
         prepare=_edit(_without_checksums(_set("dtype", "int9")))),
    Case("verify-old-manifest-shard-rows", "an old manifest (no checksums) with a shard's row count edited", "pact-cache",
         lambda w: ["verify", str(w.cache)], 1, "shard-00001.arrow: 4 rows, the manifest says 5",
         prepare=_edit(_without_checksums(_set("shards", 1, "rows", 5)))),
    Case("verify-old-manifest-totals", "an old manifest (no checksums) with `totals.rows` edited", "pact-cache",
         lambda w: ["verify", str(w.cache)], 1, "manifest.json: totals.rows 99 (the shards give 12) do not match the shard list",
         prepare=_edit(_without_checksums(_set("totals", "rows", 99)))),
    Case("verify-old-manifest-version", "an old manifest (no checksums) of format version 5", "pact-cache",
         lambda w: ["verify", str(w.cache)], 2, "format version 5, this pact reads versions 1, 2, 3, 4",
         prepare=_edit(_without_checksums(_set("format_version", 5)))),
    # shard entries pointing outside the cache directory (checksums sealed: only the name check can refuse them)
    Case("verify-shard-outside", "a shard entry `../elsewhere/shard-00000.arrow` (a real shard is there)", "pact-cache",
         lambda w: ["verify", str(w.cache)], 1, f"shards[0].file {OUTSIDE!r} is not a shard file name of the cache directory",
         prepare=_shard_elsewhere(lambda w: OUTSIDE)),
    Case("inspect-shard-absolute", "a shard entry with an absolute path", "pact-cache",
         lambda w: ["inspect", str(w.cache), "--row", "0"], 2, "shards[0].file '/",
         prepare=_shard_elsewhere(lambda w: str(w.path("elsewhere/shard-00000.arrow")))),
    Case("stats-shard-subfolder", "a shard entry `sub/shard-00000.arrow`", "pact-cache",
         lambda w: ["stats", str(w.cache)], 2, "shards[0].file 'sub/shard-00000.arrow' is not a shard file name",
         prepare=_shard_elsewhere(lambda w: "sub/shard-00000.arrow")),
    Case("merge-shard-outside", "`merge` of a cache with a shard entry outside its directory", "pact-cache",
         lambda w: ["merge", str(w.path("merged")), str(w.cache)], 2, f"shards[0].file {OUTSIDE!r}",
         prepare=_shard_elsewhere(lambda w: OUTSIDE)),
    Case("train-shard-outside", "`pact train` on a cache with a shard entry outside its directory", "pact",
         lambda w: ["train", "--cache", str(w.cache), "--out", str(w.path("trained")), "--model", str(w.model), "--device", "cpu",
                    "--max-steps", "1"], 2, f"shards[0].file {OUTSIDE!r}", prepare=_shard_elsewhere(lambda w: OUTSIDE)),
    # damaged shards
    Case("verify-truncated-shard", "a shard truncated to 100 bytes", "pact-cache", lambda w: ["verify", str(w.cache)], 1,
         "shard-00001.arrow: 100 bytes, the manifest says", prepare=_damage_shard("truncate")),
    Case("verify-deleted-shard", "a shard deleted", "pact-cache", lambda w: ["verify", str(w.cache)], 1,
         "shard-00001.arrow: cannot read", prepare=_damage_shard("delete")),
    Case("verify-swapped-shard", "a shard replaced by another valid shard file (same name, other content)", "pact-cache",
         lambda w: ["verify", str(w.cache)], 1, "problem(s): shard-00001.arrow: ", prepare=_damage_shard("swap")),
    Case("inspect-truncated-shard", "`inspect --row` of a row in a truncated shard", "pact-cache",
         lambda w: ["inspect", str(w.cache), "--row", "5"], 2, "shard-00001.arrow: 100 bytes, the manifest says",
         prepare=_damage_shard("truncate")),
    Case("stats-deleted-shard", "`stats` with a shard deleted", "pact-cache", lambda w: ["stats", str(w.cache)], 2,
         "shard-00001.arrow: cannot read", prepare=_damage_shard("delete")),
    # not a cache, or not a finished one
    Case("inspect-row-out-of-range", "`--row` past the last row", "pact-cache",
         lambda w: ["inspect", str(w.cache), "--row", "99"], 2, "row 99 is out of range: the cache has 12 rows"),
    Case("inspect-row-negative-out-of-range", "`--row` before the first row", "pact-cache",
         lambda w: ["inspect", str(w.cache), "--row", "-13"], 2, "row -13 is out of range: the cache has 12 rows"),
    Case("verify-device-unknown", "`verify --recompute 1 --device gpu` (not a torch device)", "pact-cache",
         lambda w: ["verify", str(w.cache), "--recompute", "1", "--device", "gpu"], 2,
         "argument --device: device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    Case("verify-missing-dir", "a cache directory that does not exist", "pact-cache",
         lambda w: ["verify", str(w.path("nowhere"))], 2, "nowhere is not a pact cache: no such directory"),
    Case("inspect-a-file", "a file given as the cache directory", "pact-cache",
         lambda w: ["inspect", str(w.data)], 2, "data.jsonl is not a pact cache: it is a file, not a cache directory"),
    Case("stats-not-a-cache", "a folder that is not a cache (a training run)", "pact-cache",
         lambda w: ["stats", str(w.run)], 2, "run is not a pact cache: manifest.json not found"),
    Case("verify-shards-no-manifest", "a folder of shards without a manifest (an interrupted old build)", "pact-cache",
         lambda w: ["verify", str(w.cache)], 2, "holds shard files but no manifest.json",
         prepare=lambda w: (w.cache / "manifest.json").unlink()),
    Case("verify-manifest-not-json", "a `manifest.json` that is not JSON", "pact-cache",
         lambda w: ["verify", str(w.cache)], 2, "manifest.json: not valid JSON",
         prepare=lambda w: w.write("cache/manifest.json", "{ half a manifest")),
    Case("verify-foreign-manifest", "a `manifest.json` of something else", "pact-cache",
         lambda w: ["verify", str(w.cache)], 2, 'manifest.json: not a pact-cache manifest',
         prepare=lambda w: w.write("cache/manifest.json", '{"name": "my web app"}')),
    Case("verify-incomplete", "an incomplete build", "pact-cache", lambda w: ["verify", str(w.cache)], 1,
         "the build is incomplete", prepare=_edit(_set("complete", False), seal=True)),
    Case("stats-incomplete", "`stats` of an incomplete build", "pact-cache", lambda w: ["stats", str(w.cache)], 2,
         "the build is incomplete (3 shard(s) done); finish it with `pact-cache build ... --resume`",
         prepare=_edit(_set("complete", False), seal=True)),
    # merge
    Case("merge-same-examples", "`merge` of two copies of one cache", "pact-cache",
         lambda w: ["merge", str(w.path("merged")), str(w.cache), str(w.path("copy"))], 2,
         "hold the same examples (equal examples fingerprint)", prepare=_copy_cache),
    Case("merge-out-is-a-file", "`merge` into a path that is a file", "pact-cache",
         lambda w: ["merge", str(w.data), str(w.cache)], 2, "data.jsonl is a file, not a directory"),
    Case("merge-overwrite-foreign", "`merge --overwrite` into a folder holding `notes.txt`", "pact-cache",
         lambda w: ["merge", str(w.path("merged")), str(w.cache), "--overwrite"], 2, "also holds notes.txt",
         prepare=lambda w: w.write("merged/notes.txt", "mine")),
    Case("merge-locked", "`merge` into a folder a build is writing (its lock held)", "pact-cache",
         lambda w: ["merge", str(w.path("merged")), str(w.cache)], 2, "holds the lock", prepare=_hold_lock("merged")),
    # format versions and response spans
    Case("build-resume-version-1", "`--resume` of a format-version-1 cache (this pact writes version 4)", "pact-cache",
         lambda w: _build(w, w.path("old"), "--resume", *SMALL), 2,
         "holds a format version 1 cache and this pact writes version 4, and a cache never mixes versions; use --overwrite",
         prepare=_old_version_copy),
    Case("merge-mixed-versions", "`merge` of a version-4 and a version-1 cache", "pact-cache",
         lambda w: ["merge", str(w.path("merged")), str(w.cache), str(w.path("old"))], 2, "format version: 4 vs 1",
         prepare=_old_version_copy),
    Case("verify-overlapping-spans", "a shard whose row repeats its response span (resealed)", "pact-cache",
         lambda w: ["verify", str(w.cache)], 1,
         "row 0 (example_id 0), response span 1: not an ascending, disjoint token range",
         prepare=lambda w: rewrite_response_spans(w.cache, 0, lambda rows: [rows[0] * 2, *rows[1:]])),
    Case("build-resume-other-train-on", "`--resume --train-on last` of a build made with `--train-on all`", "pact-cache",
         lambda w: _build(w, w.path("built"), *SMALL, "--resume", "--train-on", "last"), 2,
         "it was made with different settings (train_on (which assistant turns are responses): 'all' vs 'last'; data fingerprint",
         prepare=lambda w: main(_build(w, w.path("built"), *SMALL, "--train-on", "all"))),
    Case("build-abbreviated-flag", "`--rows 4` (a flag's prefix is not taken for the flag)", "pact-cache",
         lambda w: _build(w, w.path("new"), "--rows", "4"), 2, "pact-cache build: error: unrecognized arguments: --rows 4"),
    Case("build-train-on-unknown", "`--train-on first`", "pact-cache",
         lambda w: _build(w, w.path("new"), "--train-on", "first"), 2, "--train-on: train_on must be one of all, last, got 'first'"),
    # distillation
    Case("build-kd-top-k-zero", "`--kd_top_k 0`", "pact-cache", lambda w: _build(w, w.path("new"), "--kd_top_k", "0"), 2,
         "--kd_top_k: kd_top_k must be an integer >= 1, got 0"),
    Case("build-kd-top-k-whole-vocabulary", "`--kd_top_k 100000`, more than the tiny model's 384 logits", "pact-cache",
         lambda w: _build(w, w.path("new"), *SMALL, "--kd_top_k", "100000"), 2,
         "--kd_top_k 100000 must be below the vocabulary size 384"),
    Case("build-teacher-without-k", "`--teacher MODEL` without `--kd_top_k`", "pact-cache",
         lambda w: _build(w, w.path("new"), "--teacher", str(w.model)), 2,
         "--teacher: teacher needs kd_top_k: how many of the teacher's top tokens to store per step"),
    Case("build-teacher-other-tokenizer", "`--teacher` a copy of the model whose chat template differs", "pact-cache",
         lambda w: _build(w, w.path("new"), *SMALL, "--kd_top_k", "4", "--teacher", str(w.path("teacher"))), 2,
         "has another tokenizer than the model", prepare=_teacher_with_another_template),
    Case("build-kd-only-without-k", "`--safety_targets false` without `--kd_top_k` (a cache of nothing)", "pact-cache",
         lambda w: _build(w, w.path("new"), "--safety_targets", "false"), 2, "safety_targets false needs kd_top_k"),
    Case("build-kd-only-with-safety-tokens", "`--kd_top_k 4 --safety_targets false` with `--safety-tokens`", "pact-cache",
         lambda w: _build(w, w.path("new"), "--kd_top_k", "4", "--safety_targets", "false"), 2,
         "safety_tokens chooses safety tokens, which a cache with safety_targets false does not store"),
    Case("verify-safety-tokens-null", "a manifest whose `safety_tokens` is null but with no `kd_top_k` (resealed)",
         "pact-cache", lambda w: ["verify", str(w.cache)], 1,
         "kd_top_k None is not an integer in 1..vocab_size - 1, which a cache without safety tokens needs",
         prepare=_edit(_set("safety_tokens", None), seal=True)),
    Case("export-plain-cache", "`export` of a cache built without `--kd_top_k`", "pact-cache",
         lambda w: ["export", str(w.cache), "--out", str(w.path("exported"))], 2, "pact-cache build --kd_top_k"),
    Case("export-into-a-folder-with-files", "`export --out` a folder holding `notes.txt`", "pact-cache",
         lambda w: ["export", str(w.cache), "--out", str(w.path("mine"))], 2, "holds no teacher top-K",
         prepare=lambda w: w.write("mine/notes.txt", "mine")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_cache_input(case, world, capsys):
    check_case(case, world, capsys)


def test_a_lock_held_by_a_live_build_refuses_and_a_killed_one_does_not(world, capsys):
    """A second build into a directory another process is writing is refused, naming the lock and the holder's pid;
    once the holder is killed with -9 the kernel has released the lock and the build proceeds."""
    out = world.path("shared")
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pact.cache_tools.writer import DirectoryLock\n"
                               "DirectoryLock(sys.argv[1]).__enter__()\nprint('locked', flush=True)\ntime.sleep(600)\n",
         str(out)], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_build(world, out, *SMALL)) == 2
        assert f"pid {holder.pid} holds the lock {out / 'pact-cache.lock'}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert (out / "pact-cache.lock").exists()  # left by the killed holder: harmless
    assert main(_build(world, out, *SMALL)) == 0
    assert "3 shards (0 resumed)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "safety_tokens.json", "shard-00000.arrow",
                                                      "shard-00001.arrow", "shard-00002.arrow"]


def test_disk_full_mid_build_is_one_message_and_resumable(world, capsys, monkeypatch):
    """ENOSPC while shard 1 is written: exit 2, one line naming the file and the cause, then `--resume` finishes."""
    import pact.cache_tools.writer as writer

    real_fsync = os.fsync

    def failing_fsync(fd):
        if "shard-00001" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(writer.os, "fsync", failing_fsync)
    out = world.path("full")
    assert main(_build(world, out, *SMALL)) == 2
    err = capsys.readouterr().err
    assert "shard-00001.arrow: No space left on device (ENOSPC)" in err and "--resume" in err and "Traceback" not in err
    monkeypatch.undo()
    assert [s["file"] for s in load_manifest(out, allow_incomplete=True)["shards"]] == ["shard-00000.arrow"]
    assert main(_build(world, out, *SMALL, "--resume")) == 0
    assert len(CacheReader(out)) == 12


def test_unwritable_out_is_one_message_and_touches_nothing(world, capsys, monkeypatch):
    """A directory that cannot be created (permission denied, simulated: tests run as root) is named; nothing is written."""
    import pathlib

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    target = world.path("readonly/merged")
    assert main(["merge", str(target), str(world.cache)]) == 2
    assert f"cannot create the cache directory {target}: Permission denied" in capsys.readouterr().err
    assert not world.path("readonly").exists()


@NEEDS_NON_ROOT
def test_read_only_parent_is_one_message(world, capsys):
    """The same with a real read-only folder, where the OS enforces it."""
    with read_only_folder(world.path("readonly")) as parent:
        assert main(["merge", str(parent / "merged"), str(world.cache)]) == 2
        assert f"cannot create the cache directory {parent / 'merged'}" in capsys.readouterr().err


def test_manifest_without_checksums_still_verifies_with_a_note(world, capsys):
    """Caches written before the checksums keep working; verify says it cannot detect hand edits there."""
    _edit(_without_checksums(lambda manifest: None))(world)
    assert main(["verify", str(world.cache)]) == 0
    assert "note: manifest.json has no checksums (written by an older pact-cache)" in capsys.readouterr().out
    assert len(CacheReader(world.cache)) == 12


def test_resume_without_a_manifest_clears_only_its_own_leftovers(world, capsys):
    """A folder left by a build killed before any manifest (only the writer's own temporary file) resumes from scratch."""
    out = world.path("interrupted")
    world.write("interrupted/.tmp-shard-00000.arrow.4242", b"torn")
    assert main(_build(world, out, *SMALL, "--resume")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "safety_tokens.json", "shard-00000.arrow",
                                                      "shard-00001.arrow", "shard-00002.arrow"]
    assert main(["verify", str(out)]) == 0


def test_overwrite_replaces_an_interrupted_build(world, capsys):
    """`--overwrite` of a build killed mid-way (incomplete manifest, a shard it never listed, a temporary file) works."""
    out = world.path("again")
    assert main(_build(world, out, *SMALL)) == 0
    manifest = load_manifest(out)
    save_manifest(out, {**manifest, "complete": False, "shards": manifest["shards"][:1]})
    world.write("again/.tmp-manifest.json.77", b"{")
    assert main(_build(world, out, *SMALL, "--overwrite", "--limit", "8")) == 0
    assert len(CacheReader(out)) == 8 and not list(out.glob(".tmp-*")) and not (out / "shard-00002.arrow").exists()

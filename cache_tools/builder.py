"""`build_cache`: one reference pass over a training set into a cache
directory, shard by shard, resumable after any crash.

Each shard covers `rows_per_shard` consecutive examples. Within a shard the
examples are sorted by length into batches (little padding), each batch runs
`pact.reference.reference_targets` (full and post-only contexts in one
forward pass), its values are reduced to the stored columns and encoded at
once, and the rows are written back in example order. The shard is written
atomically, then the manifest is rewritten listing it, so `resume` restarts
at the first shard the manifest does not list.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow
import torch
import transformers
from tqdm.auto import tqdm

import pact
from pact.cache_tools.codec import DEFAULT_DTYPE, check_dtype
from pact.cache_tools.errors import CacheError, CacheWriteError
from pact.cache_tools.layout import Layout, select_columns
from pact.cache_tools.manifest import differences, examples_fingerprint, load_manifest, new_manifest, save_manifest, set_totals
from pact.cache_tools.reader import read_shard_table
from pact.cache_tools.schema import StepValues, build_table, encode_steps
from pact.cache_tools.writer import DEFAULT_ZSTD_LEVEL, MANIFEST_NAME, SAFETY_TOKENS_NAME, atomic_write, prepare_output_directory, remove_temporary_files, write_shard
from pact.data import EncodedExample, assistant_header_ids
from pact.models import LoadedModel, pad_token_id
from pact.objective import PactConfig
from pact.reference import ReferenceTargets, causal_lm_parts, reference_targets
from pact.safety_tokens import SafetyTokens

DEFAULT_ROWS_PER_SHARD = 1024
DEFAULT_BATCH_SIZE = 8


class _Progress:
    """The build's progress bar: examples/s from tqdm, tokens/s in the postfix."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = tqdm(total=total, initial=done, unit="ex", desc="pact-cache build", disable=not enabled, file=sys.stderr)
        self.tokens = 0

    def advance(self, examples: list[EncodedExample]) -> None:
        """Count a finished batch."""
        self.tokens += sum(len(ex.input_ids) for ex in examples)
        self.bar.update(len(examples))
        self.bar.set_postfix_str(f"{self.tokens / max(self.bar.format_dict['elapsed'], 1e-9):.0f} tok/s", refresh=False)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


@dataclass
class BuildResult:
    """What a build did: the final manifest and how many shards were reused and written."""

    directory: Path
    manifest: dict
    shards_resumed: int
    shards_built: int
    seconds: float

    def summary(self) -> str:
        """The end-of-build report: rows, response tokens, shards, bytes, bytes per response token, ratio to raw float32."""
        t = self.manifest["totals"]
        return (
            f"cache {self.directory}: {t['rows']} rows, {t['response_tokens']} response tokens, {t['shards']} shards "
            f"({self.shards_resumed} resumed), {t['bytes']} bytes = {t['bytes_per_response_token']:.1f} bytes per response "
            f"token, {t['compression_ratio']:.1f}x smaller than raw float32 ({t['raw_float32_bytes']} bytes), "
            f"{self.seconds:.1f} s"
        )


def _note(message: str) -> None:
    print(f"pact-cache: {message}", file=sys.stderr)


def _check_arguments(examples, safety_tokens: SafetyTokens, model: LoadedModel, vocab_size: int, batch_size: int,
                     rows_per_shard: int, top_k: int | None, zstd_level: int) -> None:
    if not examples:
        raise CacheError("no examples to cache")
    for name, value in (("batch size", batch_size), ("rows per shard", rows_per_shard)):
        if value < 1:
            raise CacheError(f"{name} must be at least 1, got {value}")
    if top_k is not None and top_k < 1:
        raise CacheError(f"--top-k must be at least 1, got {top_k}")
    if not 1 <= zstd_level <= 22:
        raise CacheError(f"zstd level must be in 1..22, got {zstd_level}")
    if max(safety_tokens.ids) >= vocab_size:
        raise CacheError(f"safety token id {max(safety_tokens.ids)} is outside the model's vocabulary (size {vocab_size})")
    if not any(w > 0 for w in safety_tokens.weights):
        raise CacheError("no safety token has a positive weight, so the objective has no target")
    made_for = safety_tokens.fingerprints.get("tokenizer")
    if made_for and made_for != model.tokenizer_fingerprint:
        raise CacheError("the safety tokens were computed with another tokenizer (fingerprint "
                         f"{made_for} vs the model's {model.tokenizer_fingerprint}); recompute them for this model")
    aligned = safety_tokens.fingerprints.get("aligned_model")
    if aligned and aligned != model.fingerprint:
        _note(f"warning: the safety tokens were computed for another model ({aligned}), building anyway")


def _prepare_directory(out: Path, manifest: dict, resume: bool, overwrite: bool) -> list[dict]:
    """Make `out` ready for the build; returns the shard entries a resume keeps (verified), else []."""
    if resume and overwrite:
        raise CacheError("--resume and --overwrite exclude each other")
    if not prepare_output_directory(out, overwrite):
        return []
    if not resume:
        raise CacheError(f"{out} is not empty; pass --resume to continue the build there or --overwrite to replace it")
    if not (out / MANIFEST_NAME).exists():  # interrupted before its first manifest: nothing to keep
        prepare_output_directory(out, overwrite=True)
        return []
    old = load_manifest(out, allow_incomplete=True)
    changed = differences(old, manifest)
    if changed:
        raise CacheError(f"cannot resume the build in {out}: it was made with different settings ({'; '.join(changed)}); "
                         "use the original settings, or --overwrite to start again")
    manifest["created_at"] = old["created_at"]
    removed = remove_temporary_files(out)
    if removed:
        _note(f"removed {len(removed)} unfinished file(s) of the interrupted build")
    kept = []
    for entry in old["shards"]:
        try:
            read_shard_table(out, entry)
        except CacheError as err:
            _note(f"{err}; rebuilding from this shard on")
            break
        kept.append(entry)
    return kept


def _software() -> dict:
    return {"pact": pact.__version__, "torch": torch.__version__, "transformers": transformers.__version__, "pyarrow": pyarrow.__version__}


def length_batches(examples: list[EncodedExample], batch_size: int) -> list[list[int]]:
    """Indices of `examples` grouped into batches of similar length (longest first), so padding stays small."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    return [order[begin:begin + batch_size] for begin in range(0, len(order), batch_size)]


def encode_reference(refs: list[ReferenceTargets], safety_tokens: SafetyTokens, layout: Layout, temperature: float) -> list[dict[str, np.ndarray]]:
    """Reduce reference values (all of S, one entry per example) to `layout`'s stored columns and encode them, per example."""
    numpy = lambda t: t.cpu().numpy()  # noqa: E731
    full, post, index = select_columns(torch.cat([r.full_logits for r in refs]), torch.cat([r.post_logits for r in refs]),
                                       safety_tokens.weights, layout, temperature)
    values = StepValues(numpy(full), numpy(post), numpy(torch.cat([r.post_count for r in refs])),
                        numpy(torch.cat([r.target_logprob for r in refs])), numpy(torch.cat([r.logsumexp for r in refs])),
                        None if index is None else numpy(index))
    bounds = np.cumsum([len(r.post_count) for r in refs])[:-1]
    split = {name: np.split(array, bounds) for name, array in encode_steps(values, layout).items()}
    return [{name: parts[i] for name, parts in split.items()} for i in range(len(refs))]


def _encode_shard_steps(model: LoadedModel, examples: list[EncodedExample], safety_tokens: SafetyTokens, layout: Layout,
                        objective: PactConfig, header_ids: list[int], batch_size: int, progress: _Progress) -> list[dict[str, np.ndarray]]:
    """Reference values of a shard's examples, encoded per example (in example order), batched by length."""
    ids = safety_tokens.id_tensor()
    pad_id = pad_token_id(model.tokenizer)
    steps: list[dict[str, np.ndarray] | None] = [None] * len(examples)
    for chosen in length_batches(examples, batch_size):
        batch = [examples[i] for i in chosen]
        refs = reference_targets(model.model, batch, ids, header_ids, objective.p0, objective.gate_temperature, pad_id)
        for position, encoded in zip(chosen, encode_reference(refs, safety_tokens, layout, objective.temperature)):
            steps[position] = encoded
        progress.advance(batch)
    return steps


def _record_shard(out: Path, manifest: dict, entry: dict) -> None:
    """List a written shard in the manifest and save it (the commit point of that shard)."""
    manifest["shards"].append(entry)
    save_manifest(out, set_totals(manifest))


def _write_shards(model: LoadedModel, examples: list[EncodedExample], safety_tokens: SafetyTokens, layout: Layout,
                  objective: PactConfig, header_ids: list[int], batch_size: int, rows_per_shard: int, zstd_level: int,
                  out: Path, manifest: dict, progress: _Progress) -> None:
    """Build and write every shard the manifest does not list yet.

    Shard i is compressed and written in a worker thread while shard i + 1
    runs through the model; the manifest lists a shard only once its file is
    complete, in order.
    """
    with ThreadPoolExecutor(max_workers=1) as writer, torch.inference_mode():
        pending = None
        for index in range(len(manifest["shards"]), -(-len(examples) // rows_per_shard)):
            chunk = examples[index * rows_per_shard:(index + 1) * rows_per_shard]
            steps = _encode_shard_steps(model, chunk, safety_tokens, layout, objective, header_ids, batch_size, progress)
            table = build_table(chunk, steps, layout)
            if pending is not None:
                _record_shard(out, manifest, pending.result())
            pending = writer.submit(write_shard, out, index, table, sum(len(ex.response_ids) for ex in chunk), zstd_level)
        if pending is not None:
            _record_shard(out, manifest, pending.result())


def build_cache(
    model: LoadedModel,
    examples: list[EncodedExample],
    safety_tokens: SafetyTokens,
    out_dir: str | Path,
    *,
    data: dict | None = None,
    dtype: str = DEFAULT_DTYPE,
    top_k: int | None = None,
    objective: PactConfig = PactConfig(),
    batch_size: int = DEFAULT_BATCH_SIZE,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Run the reference `model` once over `examples` and store what the PACT objective needs in `out_dir`.

    `data` is the manifest's data entry (see `manifest.describe_data`; it
    fingerprints the source file and preprocessing). `dtype` and `top_k`
    choose the stored layout (see docs/cache_format.md); `objective` supplies
    the gate's p0 and Tg (baked into post_count) and, for top-k, the T used to
    choose columns. A non-empty `out_dir` needs `resume` (continue after the
    last complete shard; refused if anything that shapes the shards differs)
    or `overwrite`. Write errors (disk full, permissions) raise
    `CacheWriteError` and leave the last manifest intact.
    """
    started = time.perf_counter()
    check_dtype(dtype)
    out = Path(out_dir).expanduser()
    vocab_size = int(causal_lm_parts(model.model)[1].shape[0])
    _check_arguments(examples, safety_tokens, model, vocab_size, batch_size, rows_per_shard, top_k, zstd_level)
    layout = Layout.create(dtype, safety_tokens.ids, safety_tokens.weights, vocab_size, top_k)
    header_ids = assistant_header_ids(model.tokenizer)
    parameter = next(model.model.parameters())
    manifest = new_manifest(
        layout=layout,
        safety_tokens=safety_tokens.to_dict(),
        model_source=model.source,
        fingerprints={"model": model.fingerprint, "tokenizer": model.tokenizer_fingerprint,
                      "data": (data or {}).get("fingerprint"), "examples": examples_fingerprint(examples)},
        header_ids=header_ids,
        gate={"p0": objective.p0, "gate_temperature": objective.gate_temperature},
        objective_temperature=objective.temperature,
        params={"dtype": dtype, "top_k": top_k, "batch_size": batch_size, "rows_per_shard": rows_per_shard,
                "zstd_level": zstd_level, "device": str(parameter.device), "model_dtype": str(parameter.dtype).removeprefix("torch.")},
        data=data,
        software=_software(),
    )
    manifest["shards"] = _prepare_directory(out, manifest, resume, overwrite)
    resumed = len(manifest["shards"])
    try:
        atomic_write(out / SAFETY_TOKENS_NAME, (json.dumps(safety_tokens.to_dict(), indent=1) + "\n").encode())
        save_manifest(out, set_totals(manifest))
        with _Progress(len(examples), min(resumed * rows_per_shard, len(examples)), progress) as bar:
            _write_shards(model, examples, safety_tokens, layout, objective, header_ids, batch_size, rows_per_shard,
                          zstd_level, out, manifest, bar)
        manifest["complete"] = True
        save_manifest(out, manifest)
    except CacheWriteError as err:
        raise CacheWriteError(f"{err}. The cache keeps its {len(manifest['shards'])} complete shard(s) and a valid manifest; "
                              "fix the cause and rerun with --resume") from err.__cause__
    return BuildResult(out, manifest, resumed, len(manifest["shards"]) - resumed, time.perf_counter() - started)

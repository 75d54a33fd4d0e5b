"""`build_cache`: one reference pass over a training set into a cache
directory, shard by shard, resumable after any crash.

Each shard covers `rows_per_shard` consecutive examples. Within a shard the
examples are sorted by length into batches (little padding), each batch runs
`pact.objective.reference.reference_targets` (full and post-only contexts in one
forward pass), its values are reduced to the stored columns and encoded at
once, and the rows are written back in example order. The shard is written
atomically, then the manifest is rewritten listing it, so `resume` rebuilds
only the shards no manifest lists.

The work splits by whole shards, in contiguous blocks (`contiguous_part`):
among the parts of a `--num-shards` build, each its own cache directory, and
among the ranks of a torchrun job, which write into one directory, each rank
keeping its own progress manifest until rank 0 writes `manifest.json`. Shard
i holds the same examples whichever way the work was split, so the result
equals a single-process build shard for shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow
import torch
import transformers
from tqdm.auto import tqdm

from pact.cache_tools.codec import DEFAULT_DTYPE, check_dtype
from pact.cache_tools.errors import CacheError, CacheWriteError
from pact.cache_tools.layout import Layout, select_columns
from pact.cache_tools.manifest import (
    delete_files, differences, directory_entries, examples_fingerprint, load_manifest, new_manifest, own_files,
    save_manifest, set_totals,
)
from pact.cache_tools.reader import read_shard_table
from pact.cache_tools.settings import DEFAULT_BATCH_SIZE, DEFAULT_ROWS_PER_SHARD, check_build_numbers
from pact.cache_tools.schema import StepValues, build_table, encode_steps
from pact.cache_tools.writer import DEFAULT_ZSTD_LEVEL, MANIFEST_NAME, RANK_MANIFEST_PATTERN, SAFETY_TOKENS_NAME, TEMP_PATTERN, DirectoryLock, make_directory, rank_manifest_name, refuse_file_in_the_way, shard_index, write_shard
from pact.data.batch import collate_examples
from pact.data.chat import EncodedExample, assistant_header_ids
from pact.devices import dtype_name
from pact.distributed import all_gather, contiguous_part, current_ranks, run_on_main
from pact.files import atomic_write
from pact.models.loading import LoadedModel, pad_token_id, tokenizer_matches
from pact.models.parts import causal_lm_parts
from pact.objective.distillation import teacher_batch_topk
from pact.objective.reference import ReferenceTargets, distillation_batch, reference_targets
from pact.objective.safety_tokens import SafetyTokens
from pact.objective.settings import ObjectiveArguments

# How long a multi-process build's ranks wait for the slowest one at the end (`distributed_session` timeout).
RANK_WAIT = timedelta(hours=24)


class _ProgressBar:
    """The build's progress bar: examples/s from tqdm, tokens/s in the postfix."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = tqdm(total=total, initial=done, unit="ex", desc="pact-cache build", disable=not enabled, file=sys.stderr)
        self.tokens = 0

    def advance(self, examples: list[EncodedExample]) -> None:
        """Count a finished batch."""
        self.tokens += sum(len(ex.input_ids) for ex in examples)
        self.bar.update(len(examples))
        self.bar.set_postfix_str(f"{self.tokens / max(self.bar.format_dict['elapsed'], 1e-9):.0f} tok/s", refresh=False)

    def __enter__(self) -> "_ProgressBar":
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
        part = self.manifest.get("part")
        name = f"{self.directory} (part {part['index']} of {part['count']})" if part else str(self.directory)
        if not t["rows"]:
            return f"cache {name}: empty, no example falls in this part, {self.seconds:.1f} s"
        return (
            f"cache {name}: {t['rows']} rows, {t['response_tokens']} response tokens, {t['shards']} shards "
            f"({self.shards_resumed} resumed), {t['bytes']} bytes = {t['bytes_per_response_token']:.1f} bytes per response "
            f"token, {t['compression_ratio']:.1f}x smaller than raw float32 ({t['raw_float32_bytes']} bytes), "
            f"{self.seconds:.1f} s"
        )


def _note(message: str) -> None:
    print(f"pact-cache: {message}", file=sys.stderr)


def _check_arguments(examples, safety_tokens: SafetyTokens | None, model: LoadedModel, vocab_size: int, part_index: int,
                     part_count: int) -> None:
    """Refuse a build that cannot work: no examples, a part outside the split, safety tokens not made for this model."""
    if not examples:
        raise CacheError("no examples to cache")
    if part_count < 1 or not 0 <= part_index < part_count:
        raise CacheError(f"--shard-index {part_index} is not in 0..{part_count - 1} (--num-shards {part_count})")
    if safety_tokens is None:
        return
    if max(safety_tokens.ids) >= vocab_size:
        raise CacheError(f"safety token id {max(safety_tokens.ids)} is outside the model's vocabulary (size {vocab_size})")
    if not any(w > 0 for w in safety_tokens.weights):
        raise CacheError("no safety token has a positive weight, so the objective has no target")
    made_for = safety_tokens.fingerprints.get("tokenizer")
    if made_for and not tokenizer_matches(model.tokenizer, made_for):
        raise CacheError("the safety tokens were computed with another tokenizer (fingerprint "
                         f"{made_for} vs the model's {model.tokenizer_fingerprint}); recompute them for this model")
    aligned = safety_tokens.fingerprints.get("aligned_model")
    if aligned and aligned != model.fingerprint:
        _note(f"warning: the safety tokens were computed for another model ({aligned}), building anyway")


def _check_teacher(model: LoadedModel, teacher: LoadedModel | None, kd_top_k: int | None, vocab_size: int,
                   safety_targets: bool) -> None:
    """Refuse a distillation setting no build can use: nothing to store, a teacher without --kd_top_k or beside a
    distillation-only build's model (which is the teacher), a K not below the vocabulary, or a teacher whose tokenizer
    or vocabulary differs from the reference's (its top-K ids would name other tokens)."""
    if not safety_targets and kd_top_k is None:
        raise CacheError("a cache without safety targets needs --kd_top_k: otherwise it would store nothing")
    if teacher is not None and not safety_targets:
        raise CacheError(f"a distillation-only cache (no safety targets) runs one model, --model, as the teacher: give "
                         f"{teacher.source} as --model rather than --teacher")
    if teacher is not None and kd_top_k is None:
        raise CacheError("a teacher was given without --kd_top_k: say how many of its top tokens to store per step")
    if kd_top_k is not None and kd_top_k >= vocab_size:
        raise CacheError(f"--kd_top_k {kd_top_k} must be below the vocabulary size {vocab_size}")
    if teacher is None:
        return
    if not tokenizer_matches(teacher.tokenizer, model.tokenizer_fingerprint):
        raise CacheError(f"the teacher {teacher.source} has another tokenizer than the model {model.source} (fingerprint "
                         f"{teacher.tokenizer_fingerprint} vs {model.tokenizer_fingerprint}): its top-K ids would name other "
                         "tokens; distil from a teacher of the same tokenizer")
    teacher_vocab = int(causal_lm_parts(teacher.model)[1].shape[0])
    if teacher_vocab != vocab_size:
        raise CacheError(f"the teacher {teacher.source} has {teacher_vocab} output logits and the model {model.source} "
                         f"{vocab_size}: distil from a teacher of the same vocabulary")


def _same_build(manifests: list[dict]) -> None:
    """Refuse ranks that would build different caches (another data file, model or setting on some node)."""
    for rank, other in enumerate(manifests[1:], start=1):
        changed = differences(manifests[0], other)
        if changed:
            raise CacheError(f"rank {rank} would build another cache than rank 0 ({'; '.join(changed)}); "
                             "give every rank the same model, data, safety tokens and settings")


def _rank_manifest_names(out: Path) -> list[str]:
    """The ranks' progress manifests in `out` (`manifest.rank-R-of-W.json`), sorted."""
    return sorted(p.name for p in out.iterdir() if RANK_MANIFEST_PATTERN.fullmatch(p.name))


def _manifest_names(out: Path) -> list[str]:
    """The manifests an earlier build left in `out`: `manifest.json`, then the ranks' progress manifests."""
    names = [MANIFEST_NAME] if (out / MANIFEST_NAME).exists() else []
    return names + _rank_manifest_names(out)


def check_output_directory(out: str | Path, resume: bool, overwrite: bool) -> list[str]:
    """Refuse, without touching anything, an output `out` the build cannot use: a file (or a path under one), a
    non-empty folder without --resume/--overwrite, or one holding files pact-cache did not write. Returns the
    files of ours already there (none for a missing or empty folder).

    The command runs it before loading any model, so a wrong `--out` costs nothing; the build runs it again
    once it holds the directory's lock.
    """
    out = Path(out).expanduser()
    if resume and overwrite:
        raise CacheError("--resume and --overwrite exclude each other")
    refuse_file_in_the_way(out)
    if not out.is_dir() or not directory_entries(out):
        return []
    if not resume and not overwrite:
        raise CacheError(f"{out} is not empty; pass --resume to continue the build there or --overwrite to replace it")
    return own_files(out, "--resume" if resume else "--overwrite")


def _prepare_directory(out: Path, manifest: dict, resume: bool, overwrite: bool) -> tuple[str, dict[int, dict]]:
    """Make `out` (existing, locked) ready for the build (done once, by rank 0, before any shard is written).

    Returns the build's creation time and, for a resume, the shards earlier
    runs finished by shard index (from every manifest they left, whatever
    their number of processes; checked later by the rank that owns them).
    Only files provably pact-cache's own are ever deleted (`own_files`): a
    directory holding anything else is refused for --overwrite and --resume.
    """
    ours = check_output_directory(out, resume, overwrite)
    if not ours:
        return manifest["created_at"], {}
    names = _manifest_names(out)
    if overwrite or not names:  # --overwrite, or a resume of a build that never wrote a manifest: nothing to keep
        delete_files(out, ours)
        return manifest["created_at"], {}
    finished: dict[int, dict] = {}
    olds = [load_manifest(out, allow_incomplete=True, name=name) for name in names]
    for old in olds:
        if old["format_version"] != manifest["format_version"]:
            raise CacheError(f"cannot resume the build in {out}: it holds a format version {old['format_version']} cache and "
                             f"this pact writes version {manifest['format_version']}, and a cache never mixes versions; "
                             "use --overwrite to rebuild it")
        changed = differences(old, manifest)
        if changed:
            raise CacheError(f"cannot resume the build in {out}: it was made with different settings ({'; '.join(changed)}); "
                             "use the original settings, or --overwrite to start again")
        finished.update((shard_index(entry["file"]), entry) for entry in old["shards"])
    unfinished = [name for name in ours if TEMP_PATTERN.fullmatch(name)]
    delete_files(out, unfinished)
    if unfinished:
        _note(f"removed {len(unfinished)} unfinished file(s) of the interrupted build")
    return olds[0]["created_at"], finished


def _start(out: Path, manifests: list[dict], safety_tokens: SafetyTokens | None, resume: bool, overwrite: bool,
           held: contextlib.ExitStack) -> tuple[str, dict[int, dict]]:
    """Rank 0's part of starting a build: check the ranks agree, create and lock `out` (the lock stays in `held`),
    prepare it, then write the (empty, incomplete) manifest and the safety tokens (if any) before any shard.

    The manifest comes first, so every later file of the build is one a
    manifest in `out` accounts for (see `manifest.cache_files`).
    """
    _same_build(manifests)
    make_directory(out)
    held.enter_context(DirectoryLock(out))
    created_at, finished = _prepare_directory(out, manifests[0], resume, overwrite)
    if not (out / MANIFEST_NAME).exists():
        save_manifest(out, {**manifests[0], "created_at": created_at})
    if safety_tokens is not None:
        atomic_write(out / SAFETY_TOKENS_NAME, (json.dumps(safety_tokens.to_dict(), indent=1) + "\n").encode(), CacheWriteError)
    return created_at, finished


def _still_valid(out: Path, finished: dict[int, dict], mine: range) -> dict[int, dict]:
    """The finished shards among `mine` whose files still match their manifest entry (size, sha256, rows)."""
    kept = {}
    for index in mine:
        if index in finished:
            try:
                read_shard_table(out, finished[index])
            except CacheError as err:
                _note(f"{err}; building it again")
                continue
            kept[index] = finished[index]
    return kept


def _software() -> dict:
    return {"pact": importlib.metadata.version("pact-cache"), "torch": torch.__version__, "transformers": transformers.__version__, "pyarrow": pyarrow.__version__}


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of sequences of `lengths` tokens grouped into batches of similar length (longest first, ties in order), so
    padding stays small: how a build batches a shard's examples, and so how `verify` recomputes them."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    return [order[begin:begin + batch_size] for begin in range(0, len(order), batch_size)]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.cpu().numpy()


def encode_reference(refs: list[ReferenceTargets], safety_tokens: SafetyTokens, layout: Layout, temperature: float) -> list[dict[str, np.ndarray]]:
    """Reduce reference values (all of S, one entry per example) to `layout`'s stored columns and encode them, per example."""
    full, post, index = select_columns(torch.cat([r.full_logits for r in refs]), torch.cat([r.post_logits for r in refs]),
                                       safety_tokens.weights, layout, temperature)
    reference = layout.stores_reference
    values = StepValues(_numpy(torch.cat([r.target_logprob for r in refs])), _numpy(torch.cat([r.logsumexp for r in refs])),
                        _numpy(full), _numpy(post), _numpy(torch.cat([r.post_count for r in refs])),
                        None if index is None else _numpy(index),
                        _numpy(torch.cat([r.full_logits for r in refs])[:, list(layout.other_positions)]) if reference else None,
                        _numpy(torch.cat([r.rest_logprob for r in refs])) if reference else None)
    if layout.kd_top_k is not None:
        values.kd_ids, values.kd_logprobs, values.kd_tail = (_numpy(torch.cat([getattr(r, name) for r in refs]))
                                                             for name in ("kd_ids", "kd_logprobs", "kd_tail"))
    return _encode_per_example(values, layout, [len(r.post_count) for r in refs])


def _encode_per_example(values: StepValues, layout: Layout, sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """The steps of consecutive examples of `sizes` steps each, encoded (`encode_steps`) and split per example."""
    split = {name: np.split(array, np.cumsum(sizes)[:-1]) for name, array in encode_steps(values, layout).items()}
    return [{name: parts[i] for name, parts in split.items()} for i in range(len(sizes))]


def _encode_distillation(model: LoadedModel, examples: list[EncodedExample], layout: Layout, pad_id: int
                         ) -> list[dict[str, np.ndarray]]:
    """A distillation-only layout's values of `examples` (the model is the teacher, one full-context pass), encoded per
    example."""
    top, target_logprob, logsumexp = distillation_batch(model.model, collate_examples(examples, pad_id), layout.kd_top_k)
    values = StepValues(_numpy(target_logprob), _numpy(logsumexp), kd_ids=_numpy(top.ids), kd_logprobs=_numpy(top.logprobs),
                        kd_tail=_numpy(top.tail))
    return _encode_per_example(values, layout, [len(ex.response_ids) for ex in examples])


def _encode_shard_steps(model: LoadedModel, examples: list[EncodedExample], safety_tokens: SafetyTokens | None, layout: Layout,
                        objective: ObjectiveArguments, header_ids: list[int], batch_size: int, progress: _ProgressBar,
                        teacher: LoadedModel | None = None) -> list[dict[str, np.ndarray]]:
    """Reference values of a shard's examples, encoded per example (in example order), batched by length; a
    distillation layout's top-K come from the reference's own logits, or from a forward pass of `teacher`; a
    distillation-only layout's from the model's full-context pass alone."""
    pad_id = pad_token_id(model.tokenizer)
    steps: list[dict[str, np.ndarray] | None] = [None] * len(examples)
    for chosen in length_batches([len(ex.input_ids) for ex in examples], batch_size):
        batch = [examples[i] for i in chosen]
        if safety_tokens is None:
            steps_of = _encode_distillation(model, batch, layout, pad_id)
        else:
            steps_of = _encode_reference_pass(model, batch, safety_tokens, layout, objective, header_ids, pad_id, teacher)
        for position, encoded in zip(chosen, steps_of):
            steps[position] = encoded
        progress.advance(batch)
    return steps


def _encode_reference_pass(model: LoadedModel, batch: list[EncodedExample], safety_tokens: SafetyTokens, layout: Layout,
                           objective: ObjectiveArguments, header_ids: list[int], pad_id: int, teacher: LoadedModel | None
                           ) -> list[dict[str, np.ndarray]]:
    """A batch's reference values (full and post-only contexts) and, in a distillation layout, the top-K of the
    reference or of `teacher`, encoded per example."""
    refs = reference_targets(model.model, batch, safety_tokens.id_tensor(), header_ids, objective.p0,
                             objective.gate_temperature, pad_id, layout.kd_top_k if teacher is None else None)
    if teacher is not None:
        top = teacher_batch_topk(teacher.model, collate_examples(batch, pad_id), layout.kd_top_k)
        sizes = [len(ex.response_ids) for ex in batch]
        refs = [dataclasses.replace(ref, kd_ids=i, kd_logprobs=lp, kd_tail=t)
                for ref, i, lp, t in zip(refs, top.ids.split(sizes), top.logprobs.split(sizes), top.tail.split(sizes))]
    return encode_reference(refs, safety_tokens, layout, objective.temperature)


@dataclass
class _RankProgress:
    """The shards this process has finished, saved after each one in its progress manifest (the shard's commit point).

    A single process keeps its progress in `manifest.json` itself; rank r of
    W > 1 in `manifest.rank-r-of-W.json`, joined into `manifest.json` at the end.
    """

    out: Path
    name: str
    manifest: dict
    done: dict[int, dict]

    def save(self) -> None:
        """Rewrite the progress manifest listing the finished shards in index order."""
        self.manifest["shards"] = [self.done[i] for i in sorted(self.done)]
        save_manifest(self.out, set_totals(self.manifest), self.name)

    def record(self, index: int, entry: dict) -> None:
        """List written shard `index` and save."""
        self.done[index] = entry
        self.save()


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """Run the block with torch's intra-op CPU thread count set to `threads` (None: leave it), restored afterwards.

    CPU matrix products sum in an order that depends on the thread count, so
    the thread count is part of what makes two builds' bytes equal.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _shard_examples(examples: list[EncodedExample], rows_per_shard: int, index: int) -> list[EncodedExample]:
    """The examples of shard `index`: `rows_per_shard` consecutive ones (the last shard may be short)."""
    return examples[index * rows_per_shard:(index + 1) * rows_per_shard]


def _write_shards(model: LoadedModel, examples: list[EncodedExample], safety_tokens: SafetyTokens, layout: Layout,
                  objective: ObjectiveArguments, header_ids: list[int], batch_size: int, rows_per_shard: int, zstd_level: int,
                  todo: list[int], record: _RankProgress, progress: _ProgressBar, teacher: LoadedModel | None) -> None:
    """Build and write the shards `todo` (indices), recording each in this process's progress manifest.

    Shard i is compressed and written in a worker thread while the next one
    runs through the model; a shard is recorded only once its file is
    complete, in order.
    """
    with ThreadPoolExecutor(max_workers=1) as writer, torch.inference_mode():
        pending = None
        for index in todo:
            chunk = _shard_examples(examples, rows_per_shard, index)
            steps = _encode_shard_steps(model, chunk, safety_tokens, layout, objective, header_ids, batch_size, progress, teacher)
            table = build_table(chunk, steps, layout)
            if pending is not None:
                record.record(pending[0], pending[1].result())
            pending = index, writer.submit(write_shard, record.out, index, table, sum(len(ex.response_ids) for ex in chunk), zstd_level)
        if pending is not None:
            record.record(pending[0], pending[1].result())


def _finish(out: Path, manifest: dict, progress: list[dict]) -> dict:
    """Write the complete `manifest.json` from every rank's progress manifest; returns it.

    Done by rank 0 once all ranks are done: the shards are listed in index
    order, then the ranks' progress manifests are removed.
    """
    final = {**manifest, "complete": True,
             "shards": sorted((entry for p in progress for entry in p["shards"]), key=lambda e: shard_index(e["file"]))}
    save_manifest(out, set_totals(final))
    for name in _rank_manifest_names(out):
        (out / name).unlink()
    return final


def build_cache(
    model: LoadedModel,
    examples: list[EncodedExample],
    safety_tokens: SafetyTokens | None,
    out_dir: str | Path,
    *,
    data: dict | None = None,
    dtype: str = DEFAULT_DTYPE,
    top_k: int | None = None,
    objective: ObjectiveArguments = ObjectiveArguments(),
    batch_size: int = DEFAULT_BATCH_SIZE,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    part_index: int = 0,
    part_count: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    kd_top_k: int | None = None,
    teacher: LoadedModel | None = None,
) -> BuildResult:
    """Run the reference `model` once over `examples` and store what the PACT objective needs in `out_dir`.

    `data` is the manifest's data entry (see `manifest.describe_data`; it
    fingerprints the source file and preprocessing). `dtype` and `top_k`
    choose the stored layout (see docs/cache_format.md); `objective` supplies
    the gate's p0 and Tg (baked into post_count) and, for top-k, the T used to
    choose columns. A non-empty `out_dir` needs `resume` (reuse every shard an
    earlier run finished; refused if anything that shapes the shards differs)
    or `overwrite`, which delete only files provably pact-cache's own (a
    directory holding others is refused). While it writes, the build holds
    `out_dir/pact-cache.lock` (rank 0 for a torchrun job; the kernel drops it if
    the process dies): a second build or merge into `out_dir` is refused. Write
    errors (disk full, permissions) raise `CacheWriteError` and leave the last
    manifest intact. Invalid counts raise `CacheError` naming the parameter.

    Shard i always holds examples [i * rows_per_shard, (i + 1) * rows_per_shard),
    so every way of splitting the work writes the same shards. With
    `part_count` K > 1 only part `part_index` of K (a contiguous block of the
    shards, `contiguous_part`) is built, into a cache of its own marked as that
    part (`pact-cache merge` joins the parts). Inside an initialized
    `torch.distributed` process group (torchrun) each rank builds its
    contiguous block of those shards into the same `out_dir`, and rank 0 writes
    the manifest once all ranks are done; every rank must call this with the
    same arguments and gets the same result.

    Determinism: a shard's forward batches are formed from its own examples
    only, so its inputs never depend on how the work was split. Its bytes are
    then equal across splits, processes and runs on the same device type and
    torch build when the pass uses the same intra-op thread count (`threads`,
    recorded as `params.threads`; None keeps torch's current count). With other
    thread counts or builds the values agree within float32 rounding, plus one
    storage step where rounding crosses a quantisation boundary.

    `kd_top_k` K also stores, per response step, a teacher's top-K ids, their
    log-probs and the log of its remaining mass (docs/distillation.md): the
    reference's own, from the logits it computes anyway, or those of `teacher`,
    a model with the same tokenizer (checked by fingerprint), in one more
    forward pass per batch. With `safety_tokens` None the cache is
    distillation-only: `model` is the teacher, and only its full-context pass
    runs (no post-only pass, no safety-token values, no gate).
    """
    started = time.perf_counter()
    check_dtype(dtype)
    check_build_numbers(batch_size, rows_per_shard, threads, top_k, zstd_level, kd_top_k)
    out = Path(out_dir).expanduser()
    vocab_size = int(causal_lm_parts(model.model)[1].shape[0])
    _check_arguments(examples, safety_tokens, model, vocab_size, part_index, part_count)
    _check_teacher(model, teacher, kd_top_k, vocab_size, safety_tokens is not None)
    if safety_tokens is None and top_k is not None:
        raise CacheError("top_k chooses among safety tokens, which a distillation-only cache does not store")
    layout = Layout.create(dtype, safety_tokens.ids if safety_tokens else [], safety_tokens.weights if safety_tokens else [],
                           vocab_size, top_k, kd_top_k)
    distiller = teacher or model
    header_ids = assistant_header_ids(model.tokenizer) if safety_tokens else []
    parameter = next(model.model.parameters())
    manifest = new_manifest(
        layout=layout,
        safety_tokens=safety_tokens.to_dict() if safety_tokens else None,
        model_source=model.source,
        fingerprints={"model": model.fingerprint, "tokenizer": model.tokenizer_fingerprint,
                      "data": (data or {}).get("fingerprint"), "examples": examples_fingerprint(examples)},
        header_ids=header_ids,
        gate={"p0": objective.p0, "gate_temperature": objective.gate_temperature} if safety_tokens else None,
        objective_temperature=objective.temperature if safety_tokens else None,
        params={"dtype": dtype, "top_k": top_k, "batch_size": batch_size, "rows_per_shard": rows_per_shard,
                "zstd_level": zstd_level, "threads": threads or torch.get_num_threads(), "device": str(parameter.device), "model_dtype": dtype_name(parameter.dtype)},
        data=data,
        software=_software(),
        part={"index": part_index, "count": part_count} if part_count > 1 else None,
        kd_teacher={"source": distiller.source, "fingerprint": distiller.fingerprint} if kd_top_k else None,
    )
    ranks = current_ranks()
    shards = -(-len(examples) // rows_per_shard)
    part = contiguous_part(range(shards), part_count, part_index)
    mine = contiguous_part(part, ranks.world_size, ranks.rank)
    if not part and ranks.is_main:
        _note(f"part {part_index} of {part_count} is empty: the data makes only {shards} shard(s) of {rows_per_shard} rows")
    manifests = all_gather(manifest)
    with contextlib.ExitStack() as held:
        manifest["created_at"], finished = run_on_main(lambda: _start(out, manifests, safety_tokens, resume, overwrite, held))
        name = MANIFEST_NAME if ranks.world_size == 1 else rank_manifest_name(ranks.rank, ranks.world_size)
        record = _RankProgress(out, name, manifest, _still_valid(out, finished, mine))
        kept = len(record.done)
        try:
            record.save()
            todo = [index for index in mine if index not in record.done]
            rows = sum(len(_shard_examples(examples, rows_per_shard, index)) for index in mine)
            done_rows = sum(entry["rows"] for entry in record.done.values())
            with _ProgressBar(rows, done_rows, progress and ranks.is_main) as bar, intra_op_threads(threads):
                _write_shards(model, examples, safety_tokens, layout, objective, header_ids, batch_size, rows_per_shard,
                              zstd_level, todo, record, bar, teacher)
            reports = all_gather((manifest, kept))
            final = run_on_main(lambda: _finish(out, manifest, [m for m, _ in reports]))
        except CacheWriteError as err:
            raise CacheWriteError(f"{err}. The cache keeps its {len(record.done)} complete shard(s) and a valid manifest; "
                                  "fix the cause and rerun with --resume") from err.__cause__
    resumed = sum(count for _, count in reports)
    return BuildResult(out, final, resumed, len(final["shards"]) - resumed, time.perf_counter() - started)

"""`verify_cache`: check a cache end to end (`pact-cache verify`).

First the manifest: its checksums (a hand edit is named by field), its
fields and shard entries, its own consistency (totals, stored columns), and
`safety_tokens.json` against the manifest's copy. Then every shard is read and
decoded as the reader does (size, sha256, schema, row and response-token
counts, row invariants) and example ids are checked unique across shards;
optionally the reference is re-run on random rows, each in the forward batch
the build ran it in and with the build's thread count (so on the build's
device type it repeats the build's arithmetic), and compared with the stored
values within the storage dtype's tolerance plus recompute noise.

Exit codes of `pact-cache verify`: 1 when it finds a problem in a pact cache
(damaged, edited, incomplete); 2 when DIR is not a pact cache it can read at
all (missing, a file, no manifest, not JSON, another format version).
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pact.cache_tools import codec, topk_codec
from pact.cache_tools.builder import intra_op_threads, length_batches
from pact.cache_tools.errors import CacheError
from pact.cache_tools.layout import Layout
from pact.cache_tools.manifest import edited_fields, manifest_problems, read_manifest, set_totals
from pact.cache_tools.reader import CacheReader
from pact.cache_tools.schema import OTHER_COLUMN
from pact.cache_tools.writer import LOCK_NAME, MANIFEST_NAME, SAFETY_TOKENS_NAME
from pact.data.batch import collate_examples
from pact.data.chat import EncodedExample
from pact.devices import dtype_name
from pact.models.loading import load_model, pad_token_id
from pact.objective.distillation import teacher_at, teacher_logits
from pact.objective.reference import reference_targets, token_logprobs

RECOMPUTE_ATOL = 2e-3
RECOMPUTE_RTOL = 1e-3


@dataclass
class VerifyReport:
    """Outcome of `verify_cache`: `problems` (each names its shard) make it fail; `notes` do not."""

    directory: Path
    shards: int = 0
    rows: int = 0
    response_tokens: int = 0
    recomputed_rows: int = 0
    worst_recompute_ratio: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def summary(self) -> str:
        """Multi-line report for the command line."""
        lines = [f"{'OK' if self.ok else 'FAILED'}: {self.directory}: {self.shards} shard(s), {self.rows} rows, "
                 f"{self.response_tokens} response tokens checked"]
        if self.recomputed_rows:
            lines.append(f"recomputed {self.recomputed_rows} row(s) with the reference model: largest difference "
                         f"{self.worst_recompute_ratio:.3f}x the allowed one (storage tolerance + {RECOMPUTE_ATOL:g} + "
                         f"{RECOMPUTE_RTOL:g} * |value|)")
        lines += [f"problem: {p}" for p in self.problems] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _check_manifest(manifest: dict, report: VerifyReport) -> None:
    """Consistency of the manifest with itself: completeness, stored columns, totals."""
    if not manifest["complete"]:
        report.problems.append(f"{MANIFEST_NAME}: the build is incomplete (complete: false); finish it with `pact-cache build ... --resume`")
    tokens = manifest["safety_tokens"] or {"ids": [], "weights": []}
    expected = Layout.create(manifest["dtype"], tokens["ids"], tokens["weights"], manifest["vocab_size"], manifest["top_k"],
                             manifest.get("kd_top_k"))
    if list(expected.stored_ids) != manifest["stored_ids"]:
        report.problems.append(f"{MANIFEST_NAME}: stored_ids are not the safety tokens with positive weight")
    totals = set_totals(copy.deepcopy(manifest))["totals"]
    recorded = manifest.get("totals") if isinstance(manifest.get("totals"), dict) else {}
    wrong = [f"totals.{key} {recorded.get(key)!r} (the shards give {value!r})" for key, value in totals.items() if recorded.get(key) != value]
    if wrong:
        report.problems.append(f"{MANIFEST_NAME}: {', '.join(wrong)} do not match the shard list")


def _check_safety_file(directory: Path, manifest: dict, report: VerifyReport) -> None:
    """`safety_tokens.json` must hold exactly the manifest's `safety_tokens` (a resume reads it)."""
    path = directory / SAFETY_TOKENS_NAME
    if manifest["safety_tokens"] is None:
        if path.exists():
            report.notes.append(f"{SAFETY_TOKENS_NAME} is ignored: the cache holds no safety targets")
        return
    if not path.is_file():
        report.notes.append(f"{SAFETY_TOKENS_NAME} is missing (readers use the manifest's copy; a --resume needs --safety-tokens)")
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        report.problems.append(f"{SAFETY_TOKENS_NAME}: not readable JSON ({err}); restore it from the manifest's safety_tokens")
        return
    expected = manifest["safety_tokens"]
    if stored != expected:
        fields = sorted(k for k in stored.keys() | expected.keys() if stored.get(k) != expected.get(k)) if isinstance(stored, dict) else []
        which = f" (field(s) {', '.join(fields)})" if fields else ""
        report.problems.append(f"{SAFETY_TOKENS_NAME} differs from the manifest's safety_tokens{which}: it was edited or "
                               "replaced; restore it from the manifest")


def _check_shards(directory: Path, report: VerifyReport) -> CacheReader:
    """Read, verify and decode every shard the manifest lists, and check example ids unique across them."""
    reader = CacheReader(directory, buffer_bytes=0, allow_incomplete=True)
    seen: dict[int, str] = {}
    for index, entry in enumerate(reader.shards):
        try:
            shard = reader.load_shard(index)
        except CacheError as err:
            report.problems.append(str(err))
            continue
        report.shards += 1
        report.rows += len(shard)
        report.response_tokens += shard.response_tokens
        for example_id in shard.example_id.tolist():
            if example_id in seen:
                report.problems.append(f"{entry['file']}: example_id {example_id} is also in {seen[example_id]}")
            seen.setdefault(example_id, entry["file"])
    listed = {entry["file"] for entry in reader.shards} | {MANIFEST_NAME, SAFETY_TOKENS_NAME, LOCK_NAME}
    others = sorted(p.name for p in directory.iterdir() if p.name not in listed)
    if others:
        report.notes.append(f"files the manifest does not list (ignored by readers): {', '.join(others)}")
    return reader


def _recomputes_teacher(manifest: dict, loaded, report: VerifyReport) -> bool:
    """Whether a distillation cache's top-K came from the reference itself, so they are recomputed with it (another
    teacher's are not: a note says so); False for other caches."""
    teacher = manifest.get("kd_teacher")
    if not teacher:
        return False
    if teacher["fingerprint"] == loaded.fingerprint:
        return True
    report.notes.append(f"recompute: the teacher top-K came from {teacher['source']!r}, another model than the reference; "
                        "they are not recomputed")
    return False


def _note_another_device(manifest: dict, loaded, report: VerifyReport) -> None:
    """Say when a 16-bit model is recomputed on another device type than the build's: its rounding then differs by
    about 1% of a logit, which may exceed the tolerance (on the build's device type the values are reproduced exactly)."""
    built_on = str(manifest["params"].get("device", "cpu")).split(":")[0]
    parameter = next(loaded.model.parameters())
    if parameter.dtype in (torch.bfloat16, torch.float16) and parameter.device.type != built_on:
        report.notes.append(f"recompute: the cache was built on {built_on} and is recomputed on {parameter.device.type}; a "
                            f"{dtype_name(parameter.dtype)} model's values are reproduced exactly only on the build's device "
                            "type, so differences of its rounding (about 1% of a logit) may be reported")


def _rows_by_shard(reader: CacheReader, chosen: list[int]) -> dict[int, set[int]]:
    """The chosen rows (global indices) as shard -> rows within it, shards in order."""
    grouped: dict[int, set[int]] = {}
    for index in chosen:
        shard_index, row_index = reader.locate(index)
        grouped.setdefault(shard_index, set()).add(row_index)
    return grouped


def _example(row: dict) -> EncodedExample:
    """The encoded example a cache row was built from."""
    spans = [(int(start), int(end)) for start, end in row["response_spans"].tolist()]
    return EncodedExample(row["example_id"], row["input_ids"].tolist(), row["response_start"], spans)


def _recomputed_batch(model, reader: CacheReader, rows: list[dict], pad: int, teacher: bool) -> list[dict[str, torch.Tensor]]:
    """Every stored value of a build batch's rows recomputed, as the build computed it (the teacher's top-K at the
    stored ids, `teacher_at`, when `teacher`), per row; a row with safety targets also gets its `post_count`."""
    examples = [_example(row) for row in rows]
    sizes = [len(ex.response_ids) for ex in examples]
    kd_ids = torch.cat([row["kd_ids"] for row in rows]) if teacher else None
    if not reader.layout.stores_safety:
        batch = collate_examples(examples, pad)
        logits = teacher_logits(model, batch)
        logsumexp, target_logprob = token_logprobs(logits, batch.labels)
        values = {"target_logprob": target_logprob, "logsumexp": logsumexp}
        if teacher:
            at = teacher_at(logits, kd_ids)
            values |= {"kd_logprobs": at.logprobs, "kd_tail": at.tail}
        return [dict(zip(values, parts)) for parts in zip(*(v.cpu().split(sizes) for v in values.values()))]
    manifest, layout = reader.manifest, reader.layout
    gate = manifest["gate"]
    refs = reference_targets(model, examples, reader.safety_ids, manifest["header_ids"], gate["p0"], gate["gate_temperature"],
                             pad, kd_ids=kd_ids)
    recomputed = []
    for ref, row in zip(refs, rows):
        columns = row["columns"].expand_as(row["full_logits"])
        values = {"full_logits": ref.full_logits.cpu().gather(1, columns), "post_logits": ref.post_logits.cpu().gather(1, columns),
                  "target_logprob": ref.target_logprob.cpu(), "logsumexp": ref.logsumexp.cpu(), "post_count": ref.post_count.cpu()}
        if layout.stores_reference:
            other_logits = ref.full_logits.cpu()[:, list(layout.other_positions)]
            if layout.other_as_logprob:
                other_logits = torch.from_numpy(codec.floor_logprob(other_logits.float().numpy(), row["logsumexp"].numpy()))
            values |= {OTHER_COLUMN: other_logits, "rest_logprob": ref.rest_logprob.cpu()}
        if teacher:
            values |= {"kd_logprobs": ref.kd_logprobs.cpu(), "kd_tail": ref.kd_tail.cpu()}
        recomputed.append(values)
    return recomputed


def _compare(shard, row_index: int, row: dict, recomputed: dict[str, torch.Tensor], report: VerifyReport) -> None:
    """Report every stored value of a row that differs from its recomputed value by more than the storage tolerance plus
    recompute noise (the post-only count: at all)."""
    where = f"{shard.name}: row {row_index} (example_id {row['example_id']})"
    steps = shard.step_range(row_index)
    count = recomputed.pop("post_count", None)
    if count is not None and not torch.equal(count, row["post_count"]):
        report.problems.append(f"{where}: recomputed post_count differs at {int((count != row['post_count']).sum())} step(s)")
    for column, values in recomputed.items():
        stored = (row["reference_logits"][:, list(shard.layout.other_positions)] if column == OTHER_COLUMN else row[column]).numpy()
        storage = topk_codec.tolerance(stored) if column.startswith("kd_") else shard.storage_tolerance(column, steps)
        allowed = storage + RECOMPUTE_ATOL + RECOMPUTE_RTOL * np.abs(stored)
        ratio = float((np.abs(values.float().numpy() - stored) / allowed).max(initial=0.0))
        report.worst_recompute_ratio = max(report.worst_recompute_ratio, ratio)
        if ratio > 1:
            report.problems.append(f"{where}: recomputed {column} differs from the stored value by {ratio:.2f}x the allowed difference")


def _recompute(reader: CacheReader, count: int, seed: int, device: str, model, report: VerifyReport) -> None:
    """Re-run the reference on `count` random rows, each in the batch the build ran it in and with the build's thread
    count, and compare with what is stored."""
    manifest = reader.manifest
    loaded = model or load_model(manifest["model_source"], device=device, dtype=manifest["params"]["model_dtype"])
    if loaded.fingerprint != manifest["fingerprints"]["model"]:
        report.problems.append(f"recompute: the model {manifest['model_source']!r} now has fingerprint {loaded.fingerprint}, "
                               f"the cache was built with {manifest['fingerprints']['model']}")
        return
    pad = pad_token_id(loaded.tokenizer)
    teacher = _recomputes_teacher(manifest, loaded, report)
    _note_another_device(manifest, loaded, report)
    chosen = sorted(random.Random(seed).sample(range(len(reader)), min(count, len(reader))))
    with intra_op_threads(manifest["params"].get("threads")), torch.inference_mode():
        for shard_index, picked in _rows_by_shard(reader, chosen).items():
            shard = reader.shard(shard_index)
            # The shard's forward batches as the build formed them: in its own batch a row's recompute repeats the
            # build's arithmetic (the same padding and batch shape), where a 16-bit model's values otherwise move by
            # about 1% of a logit.
            for batch in length_batches(np.diff(shard.token_offsets).tolist(), manifest["params"]["batch_size"]):
                if picked.isdisjoint(batch):
                    continue
                rows = [shard.row(i) for i in batch]
                for row_index, row, recomputed in zip(batch, rows, _recomputed_batch(loaded.model, reader, rows, pad, teacher)):
                    if row_index in picked:
                        _compare(shard, row_index, row, recomputed, report)
                        report.recomputed_rows += 1


def verify_cache(directory: str | Path, recompute: int = 0, seed: int = 0, device: str = "auto", model=None) -> VerifyReport:
    """Check the manifest and every shard of a cache; with `recompute` > 0 also re-run the reference on that many random rows.

    `model` (a `LoadedModel`) skips loading the manifest's model for the
    recompute. Never raises for a damaged cache: each finding becomes a
    problem naming the manifest field or the shard (and row) in the report. A
    directory that is not a readable pact cache at all raises `CacheError`.
    """
    directory = Path(directory).expanduser()
    report = VerifyReport(directory)
    _, manifest = read_manifest(directory)
    problems = manifest_problems(manifest)
    if problems:
        report.problems += [f"{MANIFEST_NAME}: {problem}" for problem in problems]
        report.notes.append("shards not checked: the manifest they are checked against cannot be trusted")
        return report
    if edited_fields(manifest) is None:
        report.notes.append(f"{MANIFEST_NAME} has no checksums (written by an older pact-cache): hand edits to it cannot be detected")
    _check_manifest(manifest, report)
    _check_safety_file(directory, manifest, report)
    reader = _check_shards(directory, report)
    if recompute > 0 and report.ok:
        _recompute(reader, recompute, seed, device, model, report)
    return report

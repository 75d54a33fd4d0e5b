"""`verify_cache`: check a cache end to end (`pact-cache verify`).

First the manifest: its checksums (a hand edit is named by field), its
fields and shard entries, its own consistency (totals, stored columns), and
`safety_tokens.json` against the manifest's copy. Then every shard is read and
decoded as the reader does (size, sha256, schema, row and response-token
counts, row invariants) and example ids are checked unique across shards;
optionally the reference is re-run on random rows and compared with the
stored values within the storage dtype's tolerance plus recompute noise.

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
from pact.cache_tools.errors import CacheError
from pact.cache_tools.layout import Layout
from pact.cache_tools.manifest import edited_fields, manifest_problems, read_manifest, set_totals
from pact.cache_tools.reader import CacheReader
from pact.cache_tools.schema import OTHER_COLUMN
from pact.cache_tools.writer import LOCK_NAME, MANIFEST_NAME, SAFETY_TOKENS_NAME
from pact.data.batch import collate_examples
from pact.data.chat import EncodedExample
from pact.models.loading import load_model, pad_token_id
from pact.objective.distillation import teacher_logits
from pact.objective.reference import reference_targets, token_logprobs
from pact.objective.student import logsumexp_outside

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


def _teacher_for_recompute(manifest: dict, loaded, report: VerifyReport):
    """The model a distillation cache's top-K came from, when it is the reference itself (else a note: another teacher's
    values are not recomputed); None for other caches."""
    teacher = manifest.get("kd_teacher")
    if not teacher:
        return None
    if teacher["fingerprint"] == loaded.fingerprint:
        return loaded.model
    report.notes.append(f"recompute: the teacher top-K came from {teacher['source']!r}, another model than the reference; "
                        "they are not recomputed")
    return None


def _recomputed_teacher(teacher, example: EncodedExample, row: dict, pad: int) -> dict[str, torch.Tensor]:
    """The teacher's log-probs at the stored top-K ids and the log of its mass outside them, recomputed ({} without a
    teacher). Taken at the stored ids, not by a new top-K, so recompute noise cannot swap near-tied ids at the K-th
    place: wrong ids show as wrong log-probs."""
    if teacher is None:
        return {}
    with torch.inference_mode():
        logp = torch.log_softmax(teacher_logits(teacher, collate_examples([example], pad)), dim=-1)
        ids = row["kd_ids"].to(logp.device)
        return {"kd_logprobs": logp.gather(1, ids).cpu(), "kd_tail": logsumexp_outside(logp, ids).clamp(max=0.0).cpu()}


def _recompute(reader: CacheReader, count: int, seed: int, device: str, model, report: VerifyReport) -> None:
    """Re-run the reference on `count` random rows and compare with what is stored."""
    manifest = reader.manifest
    loaded = model or load_model(manifest["model_source"], device=device, dtype=manifest["params"]["model_dtype"])
    if loaded.fingerprint != manifest["fingerprints"]["model"]:
        report.problems.append(f"recompute: the model {manifest['model_source']!r} now has fingerprint {loaded.fingerprint}, "
                               f"the cache was built with {manifest['fingerprints']['model']}")
        return
    pad = pad_token_id(loaded.tokenizer)
    teacher = _teacher_for_recompute(manifest, loaded, report)
    for index in sorted(random.Random(seed).sample(range(len(reader)), min(count, len(reader)))):
        shard_index, row_index = reader.locate(index)
        shard = reader.shard(shard_index)
        row = shard.row(row_index)
        spans = [(int(start), int(end)) for start, end in row["response_spans"].tolist()]
        example = EncodedExample(row["example_id"], row["input_ids"].tolist(), row["response_start"], spans)
        where = f"{shard.name}: row {row_index} (example_id {row['example_id']})"
        if reader.layout.stores_safety:
            recomputed = _recomputed_reference(loaded.model, reader, example, row, pad, where, report)
        else:
            batch = collate_examples([example], pad)
            with torch.inference_mode():
                logsumexp, target_logprob = token_logprobs(teacher_logits(loaded.model, batch), batch.labels)
            recomputed = {"target_logprob": target_logprob.cpu(), "logsumexp": logsumexp.cpu()}
        recomputed |= _recomputed_teacher(teacher, example, row, pad)
        stored_values = {column: row[column] for column in recomputed if column != OTHER_COLUMN}
        if OTHER_COLUMN in recomputed:
            stored_values[OTHER_COLUMN] = row["reference_logits"][:, list(reader.layout.other_positions)]
        steps = shard.step_range(row_index)
        for column, values in recomputed.items():
            stored = stored_values[column].numpy()
            storage = topk_codec.tolerance(stored) if column.startswith("kd_") else shard.storage_tolerance(column, steps)
            allowed = storage + RECOMPUTE_ATOL + RECOMPUTE_RTOL * np.abs(stored)
            ratio = float((np.abs(values.float().numpy() - stored) / allowed).max(initial=0.0))
            report.worst_recompute_ratio = max(report.worst_recompute_ratio, ratio)
            if ratio > 1:
                report.problems.append(f"{where}: recomputed {column} differs from the stored value by {ratio:.2f}x the allowed difference")
        report.recomputed_rows += 1


def _recomputed_reference(model, reader: CacheReader, example: EncodedExample, row: dict, pad: int, where: str,
                          report: VerifyReport) -> dict[str, torch.Tensor]:
    """The reference's values of a row with safety targets, recomputed at its stored columns (a post_count that differs
    is reported here: it is compared exactly)."""
    manifest, layout = reader.manifest, reader.layout
    gate = manifest["gate"]
    ref = reference_targets(model, [example], reader.safety_ids, manifest["header_ids"], gate["p0"], gate["gate_temperature"], pad)[0]
    columns = row["columns"].expand_as(row["full_logits"])
    recomputed = {"full_logits": ref.full_logits.cpu().gather(1, columns), "post_logits": ref.post_logits.cpu().gather(1, columns),
                  "target_logprob": ref.target_logprob.cpu(), "logsumexp": ref.logsumexp.cpu()}
    if layout.stores_reference:
        other_logits = ref.full_logits.cpu()[:, list(layout.other_positions)]
        if layout.other_as_logprob:
            other_logits = torch.from_numpy(codec.floor_logprob(other_logits.float().numpy(), row["logsumexp"].numpy()))
        recomputed |= {OTHER_COLUMN: other_logits, "rest_logprob": ref.rest_logprob.cpu()}
    if not torch.equal(ref.post_count.cpu(), row["post_count"]):
        report.problems.append(f"{where}: recomputed post_count differs at {int((ref.post_count.cpu() != row['post_count']).sum())} step(s)")
    return recomputed


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

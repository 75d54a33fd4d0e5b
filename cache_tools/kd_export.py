"""Export a knowledge-distillation cache to the dataset axolotl's KD integration trains from.

A cache built with ``pact-cache build --kd_top_k K`` holds, for every response token, the teacher's top-K token
ids (``kd_ids``, by descending log-prob), their log-probs at temperature 1 over the full vocabulary
(``kd_logprobs``) and the log of the mass outside them (``kd_tail``). `export_axolotl` writes those rows as the
pre-tokenized dataset axolotl 0.19.0's KD trainer (``axolotl.integrations.kd``) consumes, and `axolotl_config`
returns the YAML that trains from it::

    from pact.cache_tools import CacheReader
    from pact.cache_tools.kd_export import axolotl_config, export_axolotl

    out = export_axolotl(CacheReader("cache/"), "kd-export/")      # file_format="arrow" | "parquet" | "jsonl"
    print(axolotl_config(out))                                      # paste into the axolotl YAML

The dataset
-----------
One row per cache row, in cache order (export row i is cache row i), with exactly these columns, each of the
row's length L (the cache's ``input_ids``; nothing is re-tokenized):

``input_ids`` [L], ``attention_mask`` [L] (all 1), ``labels`` [L]
    the token ids; ``labels[j]`` is ``input_ids[j]`` for a response token (a position inside one of the row's
    ``response_spans``) and -100 elsewhere. axolotl treats a dataset with these three columns as already
    tokenized and passes it through unchanged (``axolotl/utils/data/wrappers.py`` ``_is_dataset_already_tokenized``),
    so no ``type:`` is needed.
``target_token_ids``, ``target_logprobs``, ``target_mask`` [L, K]
    per sequence position, a list of K. Index ``i`` holds the teacher's distribution *predicted at position i*,
    i.e. the one for token ``i + 1``: axolotl 0.19.0's KD loss pairs ``target_*[:, i]`` with the student's hidden
    state at position i, unshifted, while it shifts only the hard labels (``kernels/liger.py``
    ``LigerFusedLinearKLTopKLogprobFunction.forward``). The cache's step for the response token at position j is
    the distribution predicted at position j - 1 (docs/cache_format.md, "Shard schema": step t of span
    ``[start, end)`` predicts ``input_ids[start + t]`` from ``input_ids[:start + t]``), so it is written at index
    ``j - 1`` with ``target_mask[j - 1] = [1] * K``: ``target_mask[i]`` is 1 exactly where ``labels[i + 1] != -100``.
    Every other index ("no target": the prompt, gaps between turns, the last position) gets axolotl's own
    placeholder: ids ``0 .. K-1``, mask 0 and log-prob -1e9 (the value axolotl's collator pads with; finite, so
    the JSONL form can hold it). Masked entries never enter the loss.

``target_logprobs`` are what axolotl's own offline path feeds the trainer
(``axolotl/integrations/kd/chat_template.py`` ``transform_logprobs``): the teacher's top-K log-probs renormalised
over the K tokens and rescaled to ``kd_temperature``, ``log_softmax(kd_logprobs / T)`` over the K columns; the
trainer takes them as given (it divides only the student's logits by T). Export with the ``kd_temperature`` the
YAML sets (`axolotl_config` takes the same argument). ``renormalize=False`` keeps the cache's raw full-vocabulary
log-probs at T = 1 instead (only with ``kd_temperature=1``). ``kd_tail`` has no axolotl column and is not exported.

Formats: ``"arrow"`` is ``datasets.Dataset.save_to_disk`` (loaded by ``datasets.load_from_disk``; axolotl does
that for a local folder); ``"parquet"`` and ``"jsonl"`` are ``train-NNNNN-of-NNNNN.parquet`` / ``.jsonl`` files
(``datasets.load_dataset(folder)``, split ``train``). The ids are int32, the masks int8 and the log-probs float32
(JSONL writes each float32's exact value, so it reads back bit for bit).

Writing: rows stream through in batches of ``rows_per_batch`` (no more is held in memory), with a tqdm bar
(``progress=False`` turns it and datasets' own bars off). Everything is written under a temporary sibling
``.tmp-<name>.<pid>`` of ``out_dir`` and renamed onto ``out_dir`` only when complete; an error or interrupt removes
the temporary folder, so ``out_dir`` is either absent or a whole export (a ``kill -9`` can leave the temporary
sibling, never a half-written ``out_dir``). The ``"arrow"`` form writes the rows once more into a scratch file
inside that temporary folder first, so it needs about twice the export's size of free disk while it runs.
Refused, with a `CacheError`: a cache whose manifest has no ``kd_top_k`` (message names the cache and the build
command), an existing non-empty ``out_dir`` unless ``overwrite=True``, and, even then, an ``out_dir`` holding any
file an export does not write (``state.json``, ``dataset_info.json``, ``data-*.arrow``, datasets' ``cache-*.arrow``,
``train-*.parquet``, ``train-*.jsonl``), naming those files. A row whose KD fields do not match its spans is
refused naming the cache and the row.

Training (`axolotl_config`)
---------------------------
::

    plugins:
      - axolotl.integrations.kd.KDPlugin
    kd_trainer: true
    kd_ce_alpha: 0.1        # weight of the hard-label cross-entropy
    kd_alpha: 0.9           # weight of the top-K KL to the teacher
    kd_temperature: 1.0     # must equal the export's kd_temperature
    kd_beta: 0.0            # 0 forward KL, 1 reverse KL, in between Jensen-Shannon
    kd_normalize_topk: false  # true renormalises the *student's* log-probs over the teacher's K tokens
    sequence_len: <longest exported row>
    datasets:
      - path: /abs/path/kd-export
        split: train

Rows longer than ``sequence_len`` are dropped by axolotl (its default ``excess_length_strategy: drop``); do not use
``excess_length_strategy: truncate``, which cuts ``input_ids``/``labels`` but not the ``target_*`` columns.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pact.cache_tools.errors import CacheError, CacheWriteError

__all__ = ["COLUMNS", "FORMATS", "PLACEHOLDER_LOGPROB", "axolotl_config", "axolotl_row", "export_axolotl", "kd_top_k"]

FORMATS = ("arrow", "parquet", "jsonl")
#: Log-prob written at positions without a target (mask 0); what axolotl's DataCollatorForKD pads with.
PLACEHOLDER_LOGPROB = -1e9
COLUMNS = ("input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask")
SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("attention_mask", pa.list_(pa.int8())),
    ("labels", pa.list_(pa.int32())),
    ("target_token_ids", pa.list_(pa.list_(pa.int32()))),
    ("target_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("target_mask", pa.list_(pa.list_(pa.int8()))),
])
IGNORE_INDEX = -100
BUILD_HINT = "build one with `pact-cache build --kd_top_k K ...` (K teacher tokens kept per response token)"
# Every name an export (or datasets, mapping over a loaded export) writes; `overwrite` deletes nothing else.
_OWN_FILE = re.compile(
    r"state\.json|dataset_info\.json|data-\d{5}-of-\d{5}\.arrow|cache-[0-9a-f]+(_\d{5}_of_\d{5})?\.arrow"
    r"|train-\d{5}-of-\d{5}\.(parquet|jsonl)")


def kd_top_k(reader) -> int:
    """K from the reader's manifest (`kd_top_k`); a `CacheError` naming the cache and the build command when the cache
    holds no KD data."""
    manifest = getattr(reader, "manifest", None) or {}
    value = manifest.get("kd_top_k")
    if value is None:
        raise CacheError(f"{reader.directory} is not a knowledge-distillation cache: its manifest has no kd_top_k, "
                         f"so it holds no teacher top-K log-probs to export; {BUILD_HINT}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CacheError(f"{reader.directory}: manifest kd_top_k is {value!r}, not a positive integer")
    return value


def _numpy(value, dtype) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _teacher_logprobs(logprobs: np.ndarray, kd_temperature: float, renormalize: bool) -> np.ndarray:
    """[n, K] float32 log-probs as axolotl's offline path hands them to the trainer: `log_softmax(lp / T)` over the K
    columns (chat_template.py: exp, normalise, power 1/T, normalise, log), or the raw values."""
    if not renormalize:
        return logprobs.astype(np.float32)
    scaled = logprobs.astype(np.float64) / kd_temperature
    top = scaled.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        log_norm = top + np.log(np.exp(scaled - top).sum(axis=1, keepdims=True))
    return (scaled - log_norm).astype(np.float32)


def axolotl_row(row: dict, top_k: int, *, kd_temperature: float = 1.0, renormalize: bool = True,
                where: str = "row") -> dict[str, np.ndarray]:
    """One KD cache row as the columns of `COLUMNS` (numpy: 1-D for the first three, [L, K] for the targets).

    The step for the response token at position j goes to index j - 1 (see the module docstring); `where` names the
    row in the `CacheError` a malformed row raises."""
    input_ids = _numpy(row["input_ids"], np.int64).reshape(-1)
    length = input_ids.shape[0]
    spans = _numpy(row["response_spans"], np.int64).reshape(-1, 2)
    kd_ids = _numpy(row["kd_ids"], np.int64)
    kd_logprobs = _numpy(row["kd_logprobs"], np.float32)
    if spans.size and (np.any(spans[:, 0] < 1) or np.any(spans[:, 1] > length) or np.any(spans[:, 0] >= spans[:, 1])
                       or np.any(spans[1:, 0] < spans[:-1, 1])):
        raise CacheError(f"{where}: response_spans {spans.tolist()} are not ascending, disjoint, non-empty ranges "
                         f"inside its {length} tokens starting at 1 or later")
    positions = np.concatenate([np.arange(start, end) for start, end in spans]) if spans.size else np.zeros(0, np.int64)
    steps = positions.shape[0]
    for name, value in (("kd_ids", kd_ids), ("kd_logprobs", kd_logprobs)):
        if value.shape != (steps, top_k):
            raise CacheError(f"{where}: {name} has shape {list(value.shape)}, expected [{steps}, {top_k}] "
                             f"({steps} response tokens, kd_top_k {top_k})")
    if steps and (kd_ids.min() < 0 or kd_ids.max() > np.iinfo(np.int32).max):
        raise CacheError(f"{where}: kd_ids hold a token id outside 0..2^31-1")
    labels = np.full(length, IGNORE_INDEX, dtype=np.int32)
    labels[positions] = input_ids[positions]
    target_ids = np.broadcast_to(np.arange(top_k, dtype=np.int32), (length, top_k)).copy()
    target_logprobs = np.full((length, top_k), PLACEHOLDER_LOGPROB, dtype=np.float32)
    target_mask = np.zeros((length, top_k), dtype=np.int8)
    predicting = positions - 1
    target_ids[predicting] = kd_ids
    target_logprobs[predicting] = _teacher_logprobs(kd_logprobs, kd_temperature, renormalize)
    target_mask[predicting] = 1
    return {"input_ids": input_ids.astype(np.int32), "attention_mask": np.ones(length, dtype=np.int8),
            "labels": labels, "target_token_ids": target_ids, "target_logprobs": target_logprobs,
            "target_mask": target_mask}


def _record_batch(rows: list[dict[str, np.ndarray]], top_k: int) -> pa.RecordBatch:
    """Rows of `axolotl_row` as one Arrow record batch of `SCHEMA` (flat buffers and offsets, no Python lists)."""
    lengths = np.array([r["input_ids"].shape[0] for r in rows], dtype=np.int64)
    outer = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    inner = pa.array((np.arange(int(lengths.sum()) + 1, dtype=np.int64) * top_k).astype(np.int32))
    columns = []
    for field in SCHEMA:
        flat = np.concatenate([r[field.name].reshape(-1) for r in rows])
        if pa.types.is_list(field.type.value_type):
            values = pa.ListArray.from_arrays(inner, pa.array(flat, type=field.type.value_type.value_type))
        else:
            values = pa.array(flat, type=field.type.value_type)
        columns.append(pa.ListArray.from_arrays(outer, values))
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def _under_offset_limit(rows: list[dict[str, np.ndarray]], top_k: int):
    """`rows` in runs whose [L, K] columns hold fewer than 2^31 values (Arrow's int32 list offsets)."""
    run, held = [], 0
    for row in rows:
        size = row["input_ids"].shape[0] * top_k
        if run and held + size >= 2**31:
            yield run
            run, held = [], 0
        run.append(row)
        held += size
    if run:
        yield run


def _jsonl_lines(rows: list[dict[str, np.ndarray]]) -> str:
    lines = []
    for r in rows:
        record = {}
        for name in COLUMNS:
            value = r[name]
            # float32 -> float64 is exact, and JSON writes a float64 exactly: reading it back gives the same float32
            record[name] = (value.astype(np.float64) if value.dtype == np.float32 else value).tolist()
        lines.append(json.dumps(record, separators=(",", ":")) + "\n")
    return "".join(lines)


def _check_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Whether `out_dir` exists (as a directory, empty or replaceable); refuses what must not be replaced."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return False
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise CacheError(f"{out_dir} exists and is not a folder; choose another out_dir for the export")
    names = sorted(p.name for p in out_dir.iterdir())
    if not names:
        return True
    if not overwrite:
        raise CacheError(f"{out_dir} is not empty; pass --overwrite (overwrite=True) to replace an earlier export there, "
                         f"or choose a new folder")
    foreign = [n for n in names if not _OWN_FILE.fullmatch(n) or not (out_dir / n).is_file()]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CacheError(f"{out_dir} holds files an export does not write ({shown}); refusing to replace it even "
                         f"with overwrite=True: remove them or choose another folder")
    return True


class _Files:
    """Writes record batches as `train-NNNNN-of-NNNNN.<ext>` files of `rows_per_file` rows (parquet, jsonl) or one
    Arrow stream file (the scratch form `datasets.Dataset.from_file` reads)."""

    def __init__(self, folder: Path, file_format: str, total_rows: int, rows_per_file: int, top_k: int):
        self.folder, self.file_format, self.top_k = folder, file_format, top_k
        self.rows_per_file = rows_per_file if file_format != "arrow" else max(total_rows, 1)
        self.count = max(1, -(-total_rows // self.rows_per_file))
        self.index, self.in_file, self.handle = -1, 0, None

    def _next_file(self):
        self.close()
        self.index += 1
        self.in_file = 0
        if self.file_format == "arrow":
            self.handle = pa.ipc.new_stream(str(self.folder / "rows.arrow"), SCHEMA)
            return
        path = self.folder / f"train-{self.index:05d}-of-{self.count:05d}.{self.file_format}"
        if self.file_format == "parquet":
            self.handle = pq.ParquetWriter(str(path), SCHEMA, compression="zstd")
        else:
            self.handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, rows: list[dict[str, np.ndarray]]):
        while rows:
            if self.handle is None or self.in_file >= self.rows_per_file:
                self._next_file()
            take = rows[: self.rows_per_file - self.in_file]
            rows = rows[len(take):]
            if self.file_format == "jsonl":
                self.handle.write(_jsonl_lines(take))
            else:
                for part in _under_offset_limit(take, self.top_k):
                    self.handle.write_batch(_record_batch(part, self.top_k))
            self.in_file += len(take)

    def finish(self):
        if self.handle is None:  # an empty cache still gets its (empty) file
            self._next_file()
        self.close()

    def close(self):
        if self.handle is not None:
            if self.file_format == "jsonl":
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None


def _save_arrow(scratch: Path, export: Path, progress: bool):
    """The scratch Arrow stream as `datasets.Dataset.save_to_disk(export)` (memory-mapped, never loaded whole)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        dataset = datasets.Dataset.from_file(str(scratch / "rows.arrow"))
        dataset.save_to_disk(str(export))
        del dataset
    finally:
        if not progress and not was_disabled:
            datasets.enable_progress_bars()


def _fsync_tree(folder: Path):
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_axolotl(reader, out_dir, file_format: str = "arrow", progress: bool = True, *, overwrite: bool = False,
                   kd_temperature: float = 1.0, renormalize: bool = True, rows_per_batch: int = 64,
                   rows_per_file: int = 10_000) -> Path:
    """Write the KD cache `reader` (a `CacheReader`: `manifest`, `directory`, `len`, `reader[i]`) to `out_dir` as the
    dataset axolotl 0.19.0's KD integration trains from; returns `out_dir` (absolute). See the module docstring for
    the columns, the alignment, the formats and what is refused."""
    if file_format not in FORMATS:
        raise ValueError(f"file_format must be one of {', '.join(FORMATS)}, not {file_format!r}")
    if not kd_temperature > 0:
        raise ValueError(f"kd_temperature must be > 0, not {kd_temperature!r}")
    if not renormalize and kd_temperature != 1.0:
        raise ValueError("renormalize=False keeps the cache's temperature-1 log-probs; it needs kd_temperature=1.0 "
                         "(rescaling to another temperature needs the renormalisation over the top-K)")
    if rows_per_batch < 1 or rows_per_file < 1:
        raise ValueError("rows_per_batch and rows_per_file must be >= 1")
    top_k = kd_top_k(reader)
    out_dir = Path(out_dir).expanduser().absolute()
    replace = _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_root = out_dir.parent / f".tmp-{out_dir.name}.{os.getpid()}"
    shutil.rmtree(temp_root, ignore_errors=True)  # ours: a previous call of this same process that died uncleanly
    export = temp_root / "export"
    scratch = temp_root / "scratch"
    files = None
    try:
        export.mkdir(parents=True)
        scratch.mkdir()
        total = len(reader)
        files = _Files(scratch if file_format == "arrow" else export, file_format, total, rows_per_file, top_k)
        pending: list[dict[str, np.ndarray]] = []
        with tqdm(total=total, desc=f"export {file_format}", unit="row", disable=not progress) as bar:
            for index in range(total):
                pending.append(axolotl_row(reader[index], top_k, kd_temperature=kd_temperature,
                                           renormalize=renormalize, where=f"{reader.directory}: row {index}"))
                if len(pending) >= rows_per_batch:
                    files.write(pending)
                    bar.update(len(pending))
                    pending = []
            files.write(pending)
            bar.update(len(pending))
        files.finish()
        if file_format == "arrow":
            _save_arrow(scratch, export, progress)
        _fsync_tree(export)
        if replace and out_dir.is_dir():
            if any(out_dir.iterdir()):
                out_dir.rename(temp_root / "previous")
            else:
                out_dir.rmdir()
        export.rename(out_dir)
        fd = os.open(out_dir.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        _restore(temp_root, out_dir, files)
        raise CacheWriteError(f"writing the axolotl export {out_dir} failed: {err.strerror or err}; "
                              f"{out_dir} is left as it was") from err
    except BaseException:
        _restore(temp_root, out_dir, files)
        raise
    shutil.rmtree(temp_root, ignore_errors=True)
    return out_dir


def _restore(temp_root: Path, out_dir: Path, files: _Files | None):
    """After a failure: close the file being written, put a moved-aside earlier export back, remove the temporary
    folder."""
    if files is not None:
        try:
            files.close()
        except Exception:  # noqa: BLE001, S110 - the original error is the one to report
            pass
    previous = temp_root / "previous"
    if previous.is_dir() and not out_dir.exists():
        previous.rename(out_dir)
    shutil.rmtree(temp_root, ignore_errors=True)


def _longest_row(export_dir: Path) -> int | None:
    """Tokens in the longest row of an export folder (reads only `input_ids`), or None when it holds no export."""
    import pyarrow.compute as pc

    longest = 0
    parquet = sorted(export_dir.glob("train-*.parquet"))
    jsonl = sorted(export_dir.glob("train-*.jsonl"))
    if (export_dir / "state.json").is_file():
        import datasets

        column = datasets.load_from_disk(str(export_dir)).data.column("input_ids")
        return int(pc.max(pc.list_value_length(column)).as_py() or 0) if len(column) else 0
    if parquet:
        for path in parquet:
            column = pq.read_table(path, columns=["input_ids"]).column("input_ids")
            if len(column):
                longest = max(longest, int(pc.max(pc.list_value_length(column)).as_py() or 0))
        return longest
    if jsonl:
        for path in jsonl:
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        longest = max(longest, len(json.loads(line)["input_ids"]))
        return longest
    return None


def axolotl_config(export_dir, *, sequence_len: int | None = None, kd_temperature: float = 1.0,
                   kd_alpha: float = 0.9, kd_ce_alpha: float = 0.1, kd_beta: float = 0.0,
                   kd_normalize_topk: bool = False, base_model: str | None = None) -> str:
    """The axolotl 0.19.0 YAML (as text) that trains from the export in `export_dir`: the KD plugin and its keys, the
    dataset entry, and `sequence_len` (by default the export's longest row, so axolotl drops none). `kd_temperature`
    must be the one the export was written with."""
    export_dir = Path(export_dir).expanduser().absolute()
    if sequence_len is None:
        sequence_len = _longest_row(export_dir) if export_dir.is_dir() else None
        if sequence_len is None:
            raise CacheError(f"{export_dir} holds no axolotl export to measure; export first or pass sequence_len")
    lines = []
    if base_model:
        lines.append(f"base_model: {json.dumps(str(base_model))}")
    lines += [
        "plugins:",
        "  - axolotl.integrations.kd.KDPlugin",
        "kd_trainer: true",
        f"kd_ce_alpha: {float(kd_ce_alpha)}  # weight of the hard-label cross-entropy",
        f"kd_alpha: {float(kd_alpha)}  # weight of the top-K KL to the teacher",
        f"kd_temperature: {float(kd_temperature)}  # must equal the export's kd_temperature",
        f"kd_beta: {float(kd_beta)}  # 0 forward KL, 1 reverse KL, in between Jensen-Shannon",
        f"kd_normalize_topk: {'true' if kd_normalize_topk else 'false'}  # renormalise the student over the K tokens",
        f"sequence_len: {int(max(sequence_len, 2))}  # longer rows are dropped; keep excess_length_strategy: drop",
        "datasets:",
        f"  - path: {json.dumps(str(export_dir))}  # pre-tokenized: input_ids, labels, attention_mask, target_*",
        "    split: train",
    ]
    return "\n".join(lines) + "\n"

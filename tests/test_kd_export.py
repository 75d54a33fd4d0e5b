"""`pact.cache_tools.kd_export`: a KD cache written as the dataset axolotl 0.19.0's KD integration trains from.

A fake reader (the KD cache's row interface: `manifest` with `kd_top_k`, `directory`, `len`, `reader[i]`) with random
but valid rows, single- and multi-turn. Each format is read back with `datasets` and checked value by value: ids
exact, log-probs equal, the mask exactly on the positions predicting response tokens (index j - 1 for the response
token at j). Where axolotl is importable, the export also goes through axolotl's own loader, dataset wrapper, KD
collator and KD loss, which must reproduce the cache's values and pair each step with its predicting position."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pact.cache_tools.errors import CacheError
from pact.cache_tools.kd_export import PLACEHOLDER_LOGPROB, axolotl_config, export_axolotl

K = 4
VOCAB = 48
FORMATS = ["arrow", "parquet", "jsonl"]


class FakeKDReader:
    """A KD cache as `CacheReader` serves it; `fail_at` makes that row raise (a reader failing mid-export)."""

    def __init__(self, directory, rows, top_k=K, kd=True, fail_at=None):
        self.directory = Path(directory)
        self.manifest = {"format": "pact-cache", "format_version": 3, "complete": True}
        if kd:
            self.manifest["kd_top_k"] = top_k
        self.rows, self.fail_at, self.served = rows, fail_at, 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if index == self.fail_at:
            raise RuntimeError(f"row {index}: simulated read failure")
        self.served += 1
        return self.rows[index]


def _kd_fields(generator, steps, top_k=K):
    """The teacher's top-K (ids by descending log-prob), log-probs at T = 1 over the whole vocabulary, tail mass."""
    logprobs = torch.log_softmax(torch.randn(steps, VOCAB, generator=generator) * 3, dim=-1)
    top, ids = logprobs.topk(top_k, dim=-1)
    rest = logprobs.scatter(-1, ids, float("-inf"))
    return ids, top, torch.logsumexp(rest, dim=-1)


def make_rows(count=9, seed=0):
    """Rows cycling through: one response to the end, two turns (two spans, a gap), a response followed by tokens
    outside any span, a one-token prompt."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        kind = index % 4
        length = int(torch.randint(10, 24, (1,), generator=generator))
        if kind == 0:
            spans = [[4, length]]
        elif kind == 1:
            spans = [[3, 7], [10, length]]
        elif kind == 2:
            spans = [[5, length - 3]]
        else:
            spans = [[1, length]]
        steps = sum(end - start for start, end in spans)
        ids, logprobs, tail = _kd_fields(generator, steps)
        rows.append({
            "example_id": index,
            "input_ids": torch.randint(0, VOCAB, (length,), generator=generator),
            "response_start": spans[0][0],
            "response_spans": torch.tensor(spans, dtype=torch.long),
            "kd_ids": ids,
            "kd_logprobs": logprobs,
            "kd_tail": tail,
        })
    return rows


def response_positions(row):
    return [j for start, end in row["response_spans"].tolist() for j in range(start, end)]


def read_back(out, file_format, tmp_path):
    import datasets

    if file_format == "arrow":
        return datasets.load_from_disk(str(out))
    return datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))


def teacher(row, temperature=1.0, renormalize=True):
    logprobs = row["kd_logprobs"]
    if not renormalize:
        return logprobs.float()
    return torch.log_softmax(logprobs.double() / temperature, dim=-1).float()


def check_row(got, row, temperature=1.0, renormalize=True):
    """One exported row against its cache row, every value."""
    length = len(row["input_ids"])
    assert sorted(got) == sorted(["input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs",
                                  "target_mask"])
    assert got["input_ids"] == row["input_ids"].tolist()
    assert got["attention_mask"] == [1] * length
    positions = response_positions(row)
    ids = row["input_ids"].tolist()
    assert got["labels"] == [ids[j] if j in positions else -100 for j in range(length)]
    target_ids = np.array(got["target_token_ids"])
    target_logprobs = np.array(got["target_logprobs"], dtype=np.float64).astype(np.float32)
    target_mask = np.array(got["target_mask"])
    assert target_ids.shape == target_logprobs.shape == target_mask.shape == (length, K)
    # index i holds the distribution predicted at position i: the mask is on exactly i = j - 1 for response tokens j
    predicting = [j - 1 for j in positions]
    assert [i for i in range(length) if target_mask[i].any()] == predicting
    assert (target_mask[predicting] == 1).all()
    expected = teacher(row, temperature, renormalize).numpy()
    assert (target_ids[predicting] == row["kd_ids"].numpy()).all()
    if renormalize:
        np.testing.assert_allclose(target_logprobs[predicting], expected, rtol=1e-6, atol=1e-6)
    else:
        assert (target_logprobs[predicting] == expected).all()  # bit for bit
    others = [i for i in range(length) if i not in predicting]
    assert (target_ids[others] == np.arange(K)).all()
    assert (target_logprobs[others] == np.float32(PLACEHOLDER_LOGPROB)).all()


@pytest.mark.parametrize("file_format", FORMATS)
def test_every_value_round_trips(tmp_path, file_format):
    rows = make_rows(9)
    reader = FakeKDReader(tmp_path / "cache", rows)
    out = export_axolotl(reader, tmp_path / "export", file_format, progress=False, rows_per_batch=2, rows_per_file=4)
    assert out == (tmp_path / "export").absolute()
    if file_format != "arrow":
        assert sorted(p.name for p in out.iterdir()) == [f"train-{i:05d}-of-00003.{file_format}" for i in range(3)]
    dataset = read_back(out, file_format, tmp_path)
    assert len(dataset) == len(rows)
    for got, row in zip(dataset, rows):
        check_row(got, row)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("file_format", ["arrow", "jsonl"])
def test_raw_logprobs_are_the_cache_values_bit_for_bit(tmp_path, file_format):
    rows = make_rows(4, seed=1)
    out = export_axolotl(FakeKDReader(tmp_path / "cache", rows), tmp_path / "export", file_format, progress=False,
                         renormalize=False)
    for got, row in zip(read_back(out, file_format, tmp_path), rows):
        check_row(got, row, renormalize=False)


def test_kd_temperature_rescales_the_top_k(tmp_path):
    rows = make_rows(4, seed=2)
    out = export_axolotl(FakeKDReader(tmp_path / "cache", rows), tmp_path / "export", "parquet", progress=False,
                         kd_temperature=2.0)
    for got, row in zip(read_back(out, "parquet", tmp_path), rows):
        check_row(got, row, temperature=2.0)
    with pytest.raises(ValueError, match="kd_temperature=1.0"):
        export_axolotl(FakeKDReader(tmp_path / "cache", rows), tmp_path / "other", progress=False,
                       kd_temperature=2.0, renormalize=False)


def test_a_cache_without_kd_is_refused_naming_it_and_the_build_command(tmp_path):
    reader = FakeKDReader(tmp_path / "pact-only-cache", make_rows(2), kd=False)
    with pytest.raises(CacheError) as caught:
        export_axolotl(reader, tmp_path / "export", progress=False)
    message = str(caught.value)
    assert str(tmp_path / "pact-only-cache") in message
    assert "kd_top_k" in message and "pact-cache build --kd_top_k K" in message
    assert not (tmp_path / "export").exists()
    assert reader.served == 0


def test_an_existing_folder_is_refused_unless_overwrite(tmp_path):
    first, second = make_rows(3, seed=3), make_rows(5, seed=4)
    out = tmp_path / "export"
    out.mkdir()
    export_axolotl(FakeKDReader(tmp_path / "cache", first), out, progress=False)  # an empty folder is fine
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(CacheError, match=r"is not empty; pass --overwrite \(overwrite=True\)"):
        export_axolotl(FakeKDReader(tmp_path / "cache", second), out, "parquet", progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    export_axolotl(FakeKDReader(tmp_path / "cache", second), out, "parquet", progress=False, overwrite=True)
    dataset = read_back(out, "parquet", tmp_path)
    assert len(dataset) == 5 and not (out / "state.json").exists()
    for got, row in zip(dataset, second):
        check_row(got, row)
    # overwrite deletes only what an export writes
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="notes.txt"):
        export_axolotl(FakeKDReader(tmp_path / "cache", first), out, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CacheError, match="not a folder"):
        export_axolotl(FakeKDReader(tmp_path / "cache", first), tmp_path / "a-file", progress=False)


@pytest.mark.parametrize("file_format", FORMATS)
def test_a_failure_mid_export_leaves_no_out_dir(tmp_path, file_format):
    rows = make_rows(8, seed=5)
    before = sorted(p.name for p in tmp_path.iterdir())
    reader = FakeKDReader(tmp_path / "cache", rows, fail_at=5)
    with pytest.raises(RuntimeError, match="simulated read failure"):
        export_axolotl(reader, tmp_path / "export", file_format, progress=False, rows_per_batch=2, rows_per_file=2)
    assert reader.served == 5  # it failed part-way, after writing rows
    assert not (tmp_path / "export").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder left either
    # over an earlier export (overwrite=True), a failure leaves that export as it was
    export_axolotl(FakeKDReader(tmp_path / "cache", rows[:3]), tmp_path / "export", file_format, progress=False)
    with pytest.raises(RuntimeError):
        export_axolotl(reader, tmp_path / "export", file_format, progress=False, overwrite=True, rows_per_batch=2)
    kept = read_back(tmp_path / "export", file_format, tmp_path)
    assert len(kept) == 3
    for got, row in zip(kept, rows[:3]):
        check_row(got, row)


def test_a_row_whose_kd_fields_do_not_match_its_spans_is_refused(tmp_path):
    rows = make_rows(3, seed=6)
    rows[2] = dict(rows[2], kd_ids=rows[2]["kd_ids"][:-1])
    with pytest.raises(CacheError, match=r"row 2: kd_ids has shape"):
        export_axolotl(FakeKDReader(tmp_path / "cache", rows), tmp_path / "export", progress=False)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("file_format", FORMATS)
def test_axolotl_config(tmp_path, file_format):
    rows = make_rows(6, seed=7)
    out = export_axolotl(FakeKDReader(tmp_path / "cache", rows), tmp_path / "export", file_format, progress=False)
    config = yaml.safe_load(axolotl_config(out, kd_temperature=2.0, base_model="HuggingFaceTB/SmolLM2-135M"))
    assert config["plugins"] == ["axolotl.integrations.kd.KDPlugin"]
    assert config["kd_trainer"] is True and config["kd_temperature"] == 2.0
    assert config["kd_alpha"] == 0.9 and config["kd_ce_alpha"] == 0.1 and config["kd_beta"] == 0.0
    assert config["kd_normalize_topk"] is False
    assert config["sequence_len"] == max(len(r["input_ids"]) for r in rows)
    assert config["datasets"] == [{"path": str(out), "split": "train"}]
    assert config["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(CacheError, match="holds no axolotl export"):
        axolotl_config(tmp_path / "nothing-here")


# --- axolotl's own data path (skipped where axolotl is not installed) ---------------------------------------------


@pytest.fixture(scope="module")
def axolotl_kd():
    os.environ["AXOLOTL_DO_NOT_TRACK"] = "1"
    pytest.importorskip("axolotl")
    from axolotl.integrations.kd import KDArgs
    from axolotl.integrations.kd.collator import DataCollatorForKD
    from axolotl.integrations.kd.kernels.liger import LigerFusedLinearKLTopKLogprobLoss
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.data.wrappers import get_dataset_wrapper
    from axolotl.utils.dict import DictDefault
    from helpers import make_tiny_tokenizer

    return {"KDArgs": KDArgs, "DataCollatorForKD": DataCollatorForKD, "Loss": LigerFusedLinearKLTopKLogprobLoss,
            "load": load_dataset_with_config, "wrap": get_dataset_wrapper, "DictDefault": DictDefault,
            "tokenizer": make_tiny_tokenizer()}


def axolotl_load(axolotl_kd, config_text, monkeypatch, tmp_path):
    """The export as axolotl loads it from the YAML's dataset entry: `load_dataset_with_config`, the split pick of
    `_load_and_process_single_dataset`, then `get_dataset_wrapper`, which must pass it through untouched."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    config = yaml.safe_load(config_text)
    axolotl_kd["KDArgs"](**{k: v for k, v in config.items() if k.startswith("kd_")})  # the plugin's schema takes them
    entry = axolotl_kd["DictDefault"](config["datasets"][0])
    dataset = axolotl_kd["load"](entry, use_auth_token=False)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[entry.split]
    cfg = axolotl_kd["DictDefault"]({"dataset_num_proc": 1, "sequence_len": config["sequence_len"]})
    wrapped, _ = axolotl_kd["wrap"](entry, axolotl_kd["tokenizer"], cfg, None, dataset)
    assert wrapped is dataset  # recognised as already tokenized
    return wrapped


@pytest.mark.parametrize("file_format", FORMATS)
def test_axolotl_collator_gives_the_cache_values(axolotl_kd, tmp_path, monkeypatch, file_format):
    rows = make_rows(4, seed=8)
    out = export_axolotl(FakeKDReader(tmp_path / "cache", rows), tmp_path / "export", file_format, progress=False,
                         renormalize=False)
    dataset = axolotl_load(axolotl_kd, axolotl_config(out), monkeypatch, tmp_path)
    collator = axolotl_kd["DataCollatorForKD"](tokenizer=axolotl_kd["tokenizer"], padding="longest")
    batch = collator([dataset[i] for i in range(len(rows))])
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["target_token_ids"].shape == batch["target_logprobs"].shape == (len(rows), longest, K)
    assert batch["target_mask"].shape == (len(rows), longest, K) and batch["labels"].shape == (len(rows), longest)
    for b, row in enumerate(rows):
        length = len(row["input_ids"])
        positions = torch.tensor(response_positions(row))
        assert torch.equal(batch["input_ids"][b, :length], row["input_ids"])
        assert torch.equal(batch["labels"][b, positions], row["input_ids"][positions])
        assert int((batch["labels"][b] != -100).sum()) == len(positions)
        assert torch.equal(batch["target_token_ids"][b, positions - 1], row["kd_ids"])
        assert torch.equal(batch["target_logprobs"][b, positions - 1], row["kd_logprobs"].float())
        mask = torch.zeros(longest, K, dtype=torch.int)
        mask[positions - 1] = 1
        assert torch.equal(batch["target_mask"][b], mask)
        # the mask marks exactly the positions whose next label is trained, which is what the loss pairs
        assert torch.equal(batch["target_mask"][b, :-1, 0].bool(), batch["labels"][b, 1:] != -100)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_axolotl_kd_loss_pairs_each_step_with_its_predicting_position(axolotl_kd, tmp_path, monkeypatch, temperature):
    """axolotl's KD loss on the export equals the top-K KL of each cached step against the student's distribution at
    the position predicting that response token (and not at the token's own position)."""
    rows = make_rows(4, seed=9)
    out = export_axolotl(FakeKDReader(tmp_path / "cache", rows), tmp_path / "export", progress=False,
                         kd_temperature=temperature)
    dataset = axolotl_load(axolotl_kd, axolotl_config(out, kd_temperature=temperature), monkeypatch, tmp_path)
    batch = axolotl_kd["DataCollatorForKD"](tokenizer=axolotl_kd["tokenizer"], padding="longest")(
        [dataset[i] for i in range(len(rows))])
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(len(rows), batch["input_ids"].shape[1], 8, generator=generator)
    weight = torch.randn(VOCAB, 8, generator=generator)
    loss_fn = axolotl_kd["Loss"](0.0, 1.0, temperature, 0.0, compiled=False, compute_ce_loss=False,
                                 normalize_topk=False)
    loss = float(loss_fn(weight, hidden, batch["target_token_ids"], batch["target_logprobs"], batch["target_mask"],
                         true_labels=batch["labels"]))

    def expected(shift):
        total = 0.0
        for b, row in enumerate(rows):
            positions = torch.tensor(response_positions(row))
            student = torch.log_softmax(hidden[b, positions - shift].double() @ weight.double().T / temperature, -1)
            target = torch.log_softmax(row["kd_logprobs"].double() / temperature, -1)
            total += float((target.exp() * (target - student.gather(-1, row["kd_ids"]))).sum())
        return total * temperature**2

    assert loss == pytest.approx(expected(shift=1), rel=1e-5)
    assert loss != pytest.approx(expected(shift=0), rel=1e-2)

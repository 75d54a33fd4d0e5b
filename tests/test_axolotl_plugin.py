"""The axolotl plugin (`pact.integrations.axolotl`) driven through axolotl's own config validation and trainer
builder on the tiny model and its float32 cache (12 rows). Skipped where axolotl is not installed (CI), except the
check that nothing else in pact imports the plugin."""

import copy
import os
import re
from pathlib import Path

import pytest

from pact.objective.settings import ObjectiveArguments
from pact.training.trainer import PactTrainer

PLUGIN = "pact.integrations.axolotl.PactPlugin"
PACT_ROOT = Path(__file__).resolve().parent.parent / "pact"


@pytest.fixture(scope="module")
def axolotl():
    """axolotl's config and trainer-building functions, with the plugin registered in its plugin manager (axolotl's
    telemetry off: tests send nothing)."""
    os.environ["AXOLOTL_DO_NOT_TRACK"] = "1"
    pytest.importorskip("axolotl")
    from axolotl.integrations.base import PluginManager
    from axolotl.utils import config, trainer

    manager = PluginManager.get_instance()
    manager.register(PLUGIN)
    return manager, config, trainer


def _raw_config(cache, model_dir, out, **overrides) -> dict:
    """An axolotl YAML's content (as a dict) for a PACT run of 1 epoch on `cache` (4 rows a micro-batch, 2 a step)."""
    settings = dict(base_model=str(model_dir), plugins=[PLUGIN], pact_cache=str(cache), pact_lambda=0.5,
                    datasets=[{"path": str(Path(out) / "never-read.jsonl"), "type": "chat_template"}],
                    micro_batch_size=4, gradient_accumulation_steps=2, num_epochs=1, learning_rate=1e-3, optimizer="adamw_torch",
                    logging_steps=1, seed=3, output_dir=str(out))
    settings.update(overrides)
    return settings


def _validated(axolotl, raw: dict):
    """The config as `axolotl train` validates and normalises it."""
    from axolotl.utils.dict import DictDefault

    _, config, _ = axolotl
    cfg = DictDefault(raw)
    config.prepare_plugins(cfg)
    cfg = config.validate_config(cfg)
    config.normalize_config(cfg)
    return cfg


def test_nothing_else_in_pact_imports_the_plugin():
    """pact works without axolotl: no module outside pact/integrations imports it."""
    importers = [path for path in PACT_ROOT.rglob("*.py") if "integrations" not in path.parts
                 and re.search(r"pact\.integrations|import axolotl\b|from axolotl\b", path.read_text(encoding="utf-8"))]
    assert importers == []


def test_config_keys_are_the_declared_fields(axolotl, float32_cache, tiny_model_dir, tmp_path):
    """The plugin loads through axolotl's plugin manager; its keys are every ObjectiveArguments field (pact_lambda as
    the alias of pact_lam) plus pact_cache / pact_eval_cache / pact_force, with the declared defaults."""
    manager, _, _ = axolotl
    assert type(manager.plugins[PLUGIN]).__name__ == "PactPlugin"
    cfg = _validated(axolotl, _raw_config(float32_cache, tiny_model_dir, tmp_path, pact_objective="pact+tokenwise"))
    defaults = ObjectiveArguments()
    assert cfg.pact_lam == 0.5 and cfg.pact_objective == "pact+tokenwise" and cfg.pact_tau == defaults.tau
    assert cfg.pact_cache == str(float32_cache) and cfg.pact_force is False
    from pact.integrations.axolotl import PactArgs, objective_from

    declared = {f"pact_{name}" for name in ObjectiveArguments.__dataclass_fields__} | {"pact_cache", "pact_eval_cache", "pact_force"}
    assert set(PactArgs.model_fields) == declared
    assert objective_from(cfg) == ObjectiveArguments(lam=0.5, objective="pact+tokenwise")


@pytest.mark.parametrize("overrides, message", [
    (dict(sample_packing=True), r"sample_packing: True is not supported with the PACT plugin: PACT batches"),
    (dict(val_set_size=0.1), r"val_set_size: 0\.1 is not supported.*pact_eval_cache"),
    (dict(lr_scheduler="rex"), r"lr_scheduler: 'rex' is not supported.*AxolotlTrainer"),
    (dict(pact_lambda=-1.0), r"pact_lam: lam must be"),
    (dict(pact_objective="dpo"), r"pact_objective: objective must be one of pact, tokenwise"),
    (dict(pact_cache=None), r"pact_cache"),
])
def test_config_refuses_naming_the_key(axolotl, float32_cache, tiny_model_dir, tmp_path, overrides, message):
    """A setting PACT's trainer cannot honour, an objective constant out of range or a missing cache fails axolotl's
    config validation with the key in the message."""
    from pydantic import ValidationError

    raw = {key: value for key, value in _raw_config(float32_cache, tiny_model_dir, tmp_path, **overrides).items() if value is not None}
    with pytest.raises(ValidationError, match=message):
        _validated(axolotl, raw)


def test_every_refused_key_is_an_axolotl_setting(axolotl):
    """Each key the plugin refuses is a field of this axolotl's config schema (a renamed key would never be refused)."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    from pact.integrations.axolotl import REFUSED

    assert set(REFUSED) - set(AxolotlInputConfig.model_fields) == set()


def _model_and_tokenizer(model_dir):
    """The tiny model in float32 and its tokenizer, loaded as axolotl hands them to the trainer builder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32"), AutoTokenizer.from_pretrained(model_dir)


def test_axolotl_builds_and_trains_pact(axolotl, float32_cache, tiny_model_dir, tmp_path):
    """Through axolotl's own path (the plugin's load_datasets, then `setup_trainer`, which passes the trainer class
    axolotl's kwargs, then post_trainer_create) a PACT run trains its 2 steps on the cache: the losses are finite and
    equal to PactTrainer's on the same cache with the same TrainingArguments, and the step count is the Trainer's."""
    manager, _, trainer_setup = axolotl
    cfg = _validated(axolotl, _raw_config(float32_cache, tiny_model_dir, tmp_path / "axolotl", pact_eval_cache=str(float32_cache)))
    meta = manager.load_datasets(cfg, preprocess=False)
    assert len(meta.train_dataset) == 12 and meta.total_num_steps == 2  # 3 micro-batches of 4 rows, 2 a step
    model, tokenizer = _model_and_tokenizer(tiny_model_dir)
    trainer = trainer_setup.setup_trainer(cfg, meta.train_dataset, meta.eval_dataset, model, tokenizer, None, meta.total_num_steps)
    manager.post_trainer_create(cfg, trainer)
    assert isinstance(trainer, PactTrainer) and trainer.objective == ObjectiveArguments(lam=0.5)
    assert trainer.args.per_device_train_batch_size == 4 and trainer.args.max_steps == 2
    trainer.train()

    args = copy.deepcopy(trainer.args)
    args.output_dir, args.max_steps = str(tmp_path / "plain"), -1  # the Trainer counts the epoch's steps itself
    reference = PactTrainer(_model_and_tokenizer(tiny_model_dir)[0], args, cache=float32_cache, processing_class=tokenizer,
                            objective=ObjectiveArguments(lam=0.5), eval_cache=float32_cache)
    reference.train()
    assert reference.state.max_steps == trainer.state.global_step == 2

    def logged(run, key):
        return [entry[key] for entry in run.state.log_history if key in entry and "train_runtime" not in entry]

    losses = logged(trainer, "loss")
    assert len(losses) == 2 and all(map(lambda value: value == value and abs(value) < float("inf"), losses))
    assert losses == pytest.approx(logged(reference, "loss"), rel=1e-6)
    assert logged(trainer, "kl") == pytest.approx(logged(reference, "kl"), rel=1e-6)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(reference.evaluate()["eval_loss"], rel=1e-6)


def test_trainer_refuses_axolotl_datasets(axolotl, float32_cache, tiny_model_dir, tmp_path):
    """Handed axolotl's tokenized dataset instead of the cache (a path that skips the plugin's load_datasets), the
    trainer refuses rather than train on something else than the cache."""
    from datasets import Dataset

    from pact.errors import PactError

    manager, _, trainer_setup = axolotl
    cfg = _validated(axolotl, _raw_config(float32_cache, tiny_model_dir, tmp_path))
    model, tokenizer = _model_and_tokenizer(tiny_model_dir)
    tokenized = Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]]})
    with pytest.raises(PactError, match=r"trains on the cache pact_cache=.* but axolotl handed it Dataset"):
        trainer_setup.setup_trainer(cfg, tokenized, None, model, tokenizer, None, 1)

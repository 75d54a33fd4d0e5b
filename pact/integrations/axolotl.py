"""PACT as an axolotl plugin: `plugins: [pact.integrations.axolotl.PactPlugin]` in an axolotl YAML trains the model
axolotl loads (with its LoRA, precision and optimizer settings) with `PactTrainer` on a reference cache.

The cache (`pact_cache`, built by `pact-cache build` from the same base model) is the training set: the plugin loads
it in place of axolotl's datasets, which axolotl's config schema still requires but which are never read or
tokenized. The config keys are generated from the fields that declare them: `pact_<name>` for every
`ObjectiveArguments` field (and its underscore aliases, e.g. `pact_lambda`), and `pact_cache`, `pact_eval_cache` and
`pact_force` from `PactTrainingArguments`. Settings PACT's trainer cannot honour (sample packing, axolotl's own
schedulers and samplers, RL trainers, ...) are refused at config validation, naming the key. docs/integrations.md.

Nothing else in pact imports this module: axolotl is an optional extra (`pip install pact-cache[axolotl]`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from typing import Any, Callable

from axolotl.common.datasets import TrainDatasetMeta
from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger
from pydantic import AliasChoices, BaseModel, Field, create_model, model_validator

from pact.cache_tools import CacheReader
from pact.errors import InvalidSetting, PactError
from pact.objective.settings import ObjectiveArguments
from pact.training.arguments import PactTrainingArguments
from pact.training.trainer import PactTrainer, check_cache_serves

LOG = get_logger(__name__)

PREFIX = "pact_"
TRAINING_FIELDS = ("cache", "eval_cache", "force")  # the `PactTrainingArguments` fields an axolotl config sets
REQUIRED_FIELDS = ("cache",)


def _above_one(value) -> bool:
    """Whether a parallelism degree asks for more than one process per group."""
    return value is not None and value > 1


_AXOLOTL_TRAINER = ("is implemented by axolotl's own trainer (AxolotlTrainer), which PACT's trainer replaces; use a "
                    "transformers lr_scheduler / optimizer setting instead")
_ORDER = "PACT orders the cache's rows itself (a seeded shard-aware shuffle, length-bucketed)"
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {  # bool: true, a non-zero number, a non-empty list
    "sample_packing": (bool, "PACT batches the cache's rows itself; packing would join rows into one sequence"),
    "eval_sample_packing": (bool, "PACT batches the eval cache's rows itself; packing would join rows into one sequence"),
    "pretraining_dataset": (bool, "the PACT cache (pact_cache) is the training set"),
    "rl": (bool, "PACT fine-tunes on the cache's responses; axolotl's preference/RL trainers do not apply"),
    "reward_model": (bool, "PACT trains a causal LM, not a reward model"),
    "process_reward_model": (bool, "PACT trains a causal LM, not a reward model"),
    "orpo_alpha": (bool, "ORPO's loss is not PACT's"),
    "use_eaft": (bool, "it replaces the loss, and PACT computes its own"),
    "val_set_size": (bool, "evaluation runs on pact_eval_cache (a second cache), not on a split of axolotl's datasets"),
    "test_datasets": (bool, "evaluation runs on pact_eval_cache (a second cache), not on axolotl's datasets"),
    "train_on_inputs": (bool, "the cache records which tokens are the response, and PACT's loss covers exactly those"),
    "fix_untrained_tokens": (bool, "it reads axolotl's tokenized dataset, which a PACT run does not load"),
    "group_by_length": (bool, _ORDER),
    "curriculum_sampling": (bool, _ORDER),
    "do_bench_eval": (bool, _AXOLOTL_TRAINER),
    "do_causal_lm_eval": (bool, _AXOLOTL_TRAINER),
    "cosine_min_lr_ratio": (bool, _AXOLOTL_TRAINER),
    "cosine_constant_lr_ratio": (bool, _AXOLOTL_TRAINER),
    "lr_quadratic_warmup": (bool, _AXOLOTL_TRAINER),
    "embedding_lr": (bool, _AXOLOTL_TRAINER),
    "embedding_lr_scale": (bool, _AXOLOTL_TRAINER),
    "lr_groups": (bool, _AXOLOTL_TRAINER),
    "loraplus_lr_ratio": (bool, _AXOLOTL_TRAINER),
    "relora": (bool, _AXOLOTL_TRAINER),
    "jagged_restart_steps": (bool, _AXOLOTL_TRAINER),
    "lisa_n_layers": (bool, _AXOLOTL_TRAINER),
    "activation_offloading": (bool, _AXOLOTL_TRAINER),
    "layer_offloading": (bool, _AXOLOTL_TRAINER),
    "lr_scheduler": (lambda value: value in ("one_cycle", "rex"), _AXOLOTL_TRAINER),
    "sequence_parallel_degree": (_above_one, "PACT's loss runs over whole rows on each process"),
    "context_parallel_size": (_above_one, "PACT's loss runs over whole rows on each process"),
    "tensor_parallel_size": (_above_one, "PACT's loss projects onto the whole LM head on each process"),
}
"""axolotl config keys PACT refuses: key -> (whether the value asks for it, why PACT cannot honour it)."""


def _declared(cls) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    """The dataclass fields of `cls` by name, and their resolved types."""
    return {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)


def _config_field(name: str, field: dataclasses.Field, annotation, required: bool) -> tuple[Any, Any]:
    """The pydantic field `pact_<name>` for a dataclass field: its type, default and help; the field's `--x` aliases
    written with underscores (`--lambda` -> `pact_lambda`) are accepted too."""
    aliases = [f"{PREFIX}{alias[2:]}" for alias in field.metadata.get("aliases", ()) if "-" not in alias[2:]]
    key = PREFIX + name
    if required:  # `str | None` (None: not given) becomes `str`
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    return annotation, Field(... if required else field.default, description=field.metadata.get("help"),
                             validation_alias=AliasChoices(key, *aliases))


def _config_fields() -> dict[str, tuple[Any, Any]]:
    """The plugin's config keys: every `ObjectiveArguments` field and `TRAINING_FIELDS` of `PactTrainingArguments`."""
    fields = {}
    for cls, names in ((ObjectiveArguments, None), (PactTrainingArguments, TRAINING_FIELDS)):
        declared, hints = _declared(cls)
        for name in names or declared:
            fields[PREFIX + name] = _config_field(name, declared[name], hints[name], name in REQUIRED_FIELDS)
    return fields


def objective_from(config: dict) -> ObjectiveArguments:
    """The `ObjectiveArguments` of a config's `pact_<field>` values (a missing one takes its declared default);
    `InvalidSetting` naming the config key when a value is out of range."""
    values = {f.name: config[PREFIX + f.name] for f in dataclasses.fields(ObjectiveArguments)
              if config.get(PREFIX + f.name) is not None}
    try:
        return ObjectiveArguments(**values)
    except InvalidSetting as err:
        raise InvalidSetting(PREFIX + err.field, f"{PREFIX}{err.field}: {err}") from err


class _PactChecks(BaseModel):
    """The checks of a PACT axolotl config; `PactArgs` adds the generated `pact_*` fields. axolotl mixes `PactArgs`
    into its own config model, so these validators see the whole config."""

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data):
        """Refuse the axolotl settings PACT's trainer cannot honour, naming the key and why."""
        if isinstance(data, dict):
            asked = [(key, why) for key, (asks, why) in REFUSED.items() if asks(data.get(key))]
            if asked:
                raise ValueError("; ".join(f"{key}: {data[key]!r} is not supported with the PACT plugin: {why}"
                                           for key, why in asked))
        return data

    @model_validator(mode="after")
    def check_objective(self):
        """Refuse an objective constant out of its range, naming its `pact_` key."""
        try:
            objective_from({name: getattr(self, name) for name in type(self).model_fields if name.startswith(PREFIX)})
        except InvalidSetting as err:
            raise ValueError(str(err)) from err
        return self


PactArgs = create_model("PactArgs", __base__=_PactChecks, __module__=__name__, **_config_fields())
PactArgs.__doc__ = "The PACT plugin's axolotl config keys (generated from `ObjectiveArguments` and `PactTrainingArguments`)."


@dataclass(frozen=True)
class PactSettings:
    """What a PACT run takes from the axolotl config."""

    cache: str
    eval_cache: str | None
    force: bool
    objective: ObjectiveArguments

    @classmethod
    def from_config(cls, cfg) -> PactSettings:
        """The settings of a validated axolotl config; `InvalidSetting` naming `pact_cache` when it is missing."""
        if not cfg.get(PREFIX + "cache"):
            raise InvalidSetting(PREFIX + "cache", "pact_cache is required: the directory `pact-cache build` wrote for "
                                                   "this config's base_model")
        return cls(str(cfg[PREFIX + "cache"]), cfg.get(PREFIX + "eval_cache"), bool(cfg.get(PREFIX + "force")),
                   objective_from(cfg))


def steps_of(cache: CacheReader, cfg, world_size: int) -> int:
    """The optimizer steps of `cfg.num_epochs` passes over the cache, as the Trainer counts them: global micro-batches
    of `micro_batch_size x world_size` rows, `gradient_accumulation_steps` of them a step (a short last step counts)."""
    micro_batches = math.ceil(len(cache) / (cfg.micro_batch_size * world_size))
    per_epoch = max(math.ceil(micro_batches / cfg.gradient_accumulation_steps), 1)
    return math.ceil(cfg.num_epochs * per_epoch)


class AxolotlPactTrainer(PactTrainer):
    """`PactTrainer` built from what axolotl's trainer builder passes a plugin's trainer class.

    `train_dataset` must be the `CacheReader` `PactPlugin.load_datasets` returned (the cache is the training set) and
    `eval_dataset` the eval cache's or None. axolotl's `data_collator` (for tokenized rows), `eval_data_collator`,
    `bench_data_collator` and `dataset_tags` serve its own trainer and are not used: PACT collates cache rows itself.
    `args` (axolotl's TrainingArguments: batch size, accumulation, learning rate, optimizer, scheduler, precision,
    checkpoints) is kept as it is. `PactPlugin.get_trainer_cls` binds `pact_settings` in a subclass.
    """

    pact_settings: PactSettings | None = None

    def __init__(self, model, args, *, train_dataset, processing_class, eval_dataset=None, data_collator=None,
                 eval_data_collator=None, bench_data_collator=None, dataset_tags=None, compute_loss_func=None, **kwargs):
        settings = self.pact_settings
        if settings is None:
            raise PactError("AxolotlPactTrainer is built by PactPlugin.get_trainer_cls(cfg), which binds the config's "
                            "pact_* settings; list pact.integrations.axolotl.PactPlugin under plugins")
        if not isinstance(train_dataset, CacheReader):
            raise PactError(f"the PACT trainer trains on the cache pact_cache={settings.cache}, but axolotl handed it "
                            f"{type(train_dataset).__name__} (its own datasets); train with `axolotl train`, where "
                            "PactPlugin.load_datasets loads the cache in their place")
        if compute_loss_func is not None:
            raise PactError("axolotl passed a compute_loss_func (use_eaft), but PACT computes its own loss")
        super().__init__(model, args, cache=train_dataset, processing_class=processing_class, objective=settings.objective,
                         eval_cache=eval_dataset, force=settings.force, **kwargs)
        for warning in self.warnings:
            LOG.warning(f"pact_force: training anyway although the {warning}")


class PactPlugin(BasePlugin):
    """The axolotl plugin: its config keys (`PactArgs`), the cache as the dataset, and `AxolotlPactTrainer`."""

    def get_input_args(self) -> str:
        """The pydantic model of the plugin's config keys, as axolotl imports it."""
        return f"{__name__}.PactArgs"

    def load_datasets(self, cfg, preprocess: bool = False) -> TrainDatasetMeta:
        """The cache (and eval cache) in place of axolotl's datasets, which are not read, with the run's step count;
        a cache that cannot train the objective is refused here, before the model is loaded."""
        settings = PactSettings.from_config(cfg)
        caches = [CacheReader(path) for path in (settings.cache, settings.eval_cache) if path]
        for reader in caches:
            check_cache_serves(reader, settings.objective)
        if cfg.get("datasets"):
            LOG.warning(f"datasets: not read: PACT trains on the cache pact_cache={settings.cache}, which `pact-cache "
                        "build` made from its own data (axolotl's config schema requires the key)")
        steps = steps_of(caches[0], cfg, int(os.environ.get("WORLD_SIZE", "1")))
        return TrainDatasetMeta(train_dataset=caches[0], eval_dataset=caches[1] if len(caches) > 1 else None,
                                total_num_steps=steps)

    def get_trainer_cls(self, cfg) -> type[AxolotlPactTrainer]:
        """`AxolotlPactTrainer` bound to this config's PACT settings."""
        return type("AxolotlPactTrainer", (AxolotlPactTrainer,), {"pact_settings": PactSettings.from_config(cfg)})

    def post_trainer_create(self, cfg, trainer) -> None:
        """Refuse a run whose trainer is not PACT's: axolotl takes the first plugin's trainer class, so a plugin listed
        before this one may have replaced it."""
        if not isinstance(trainer, PactTrainer):
            raise PactError(f"axolotl built a {type(trainer).__name__}, not PACT's trainer: another plugin listed before "
                            "pact.integrations.axolotl.PactPlugin under plugins supplies its own trainer class; remove it")

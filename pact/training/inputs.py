"""What `PactTrainer` is given, in the shapes TRL's `SFTTrainer` takes, turned into what it trains on: a model given by
name is loaded, a `peft_config` wraps the model, a dataset (or data file) becomes its reference cache, built on first
use and reused after (`pact.training.data_cache`), and a cache is a cache whichever argument holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed

from pact.cache_tools import CacheReader
from pact.cache_tools.settings import ExampleArguments
from pact.cache_tools.writer import MANIFEST_NAME
from pact.data.rows import DataSourceArguments
from pact.errors import PactError
from pact.models.adapters import with_peft_config
from pact.models.loading import LoadedModel, load_model, load_tokenizer, model_fingerprint, tokenizer_fingerprint
from pact.models.parts import unwrapped
from pact.models.quantization import is_quantized
from pact.objective.settings import ObjectiveArguments
from pact.training.data_cache import cache_from_data


@dataclass
class TrainerInputs:
    """The model, tokenizer and caches a `PactTrainer` trains with, and the model's fingerprint when it is known."""

    model: object
    tokenizer: object
    cache: CacheReader
    eval_cache: CacheReader | None
    fingerprint: str | None


# SFTTrainer's arguments PactTrainer does not take, and why (refused by name when given).
NOT_TAKEN = {
    "compute_loss_func": "the loss is the PACT objective (choose it with objective=ObjectiveArguments(objective=...))",
    "formatting_func": "rows are read in their own format (alpaca, messages, prompt_completion, sharegpt) and rendered with "
                       "the tokenizer's chat template",
    "data_collator": "batches are collated from the cache's rows by the trainer itself",
    "quantization_config": "a model given by name is quantised by args (load_in_4bit / load_in_8bit of PactTrainingArguments)",
}
# TRL SFTConfig settings the PACT loop cannot honour: the value it runs with, and why (refused by name when `args` is an
# `SFTConfig` set otherwise; the loss is always over the responses, as TRL's completion_only_loss / assistant_only_loss).
SFT_SETTINGS = {
    "packing": (False, "each row's response positions carry their own cached targets; packed rows are not supported"),
    "padding_free": (False, "batches are padded and masked; padding-free batches are not supported"),
    "completion_only_loss": (True, "the CE and KL are over the responses only, never the prompts"),
    "loss_type": ("nll", "the loss is the objective's (objective=ObjectiveArguments(objective=...))"),
}


def check_taken(kwargs: dict, args) -> None:
    """Refuse, by name, an `SFTTrainer` argument (`NOT_TAKEN`) or a TRL `SFTConfig` setting (`SFT_SETTINGS`) the PACT
    loop would not honour, rather than ignore it."""
    for name, why in NOT_TAKEN.items():
        if kwargs.get(name) is not None:
            raise PactError(f"PactTrainer does not take {name}=: {why}")
    for name, (supported, why) in SFT_SETTINGS.items():
        value = getattr(args, name, supported)
        if value is not None and value != supported:
            raise PactError(f"args.{name}={value!r} cannot be honoured by PactTrainer: {why}; leave it at {supported!r}")


def default_output_dir(model) -> str:
    """The run folder of a trainer given no arguments, named after the model as TRL names its own (`<model>-PACT`)."""
    name = model if isinstance(model, str) else getattr(unwrapped(model).config, "_name_or_path", "") or "model"
    return f"{Path(str(name)).name or 'model'}-PACT"


def resolve_inputs(model, args, *, train_dataset, eval_dataset, cache, eval_cache, processing_class, peft_config,
                   objective: ObjectiveArguments, model_fingerprint_: str | None) -> TrainerInputs:
    """The trainer's model, tokenizer and caches from its arguments.

    `model` is a model or a name (`load_model`: a folder, hub id, `.gguf` file or the embedded default). The training
    cache is `cache`, else `train_dataset` (a cache folder or `CacheReader`, or data: a `datasets.Dataset`, a data file
    or folder, a hub dataset id, in any row format), else `args.cache` / `args.data`; data becomes its cache with the
    model as reference, before `peft_config` wraps it. `eval_dataset` / `eval_cache` likewise. `args` settle how data
    becomes a cache when they are `PactTrainingArguments` (`max_length`, `train_on`, `safety_tokens`, the cache folder).
    """
    fingerprint = model_fingerprint_
    if isinstance(model, (str, Path)):
        quantization = getattr(args, "quantization", None)
        loaded = load_model(str(model), device=str(args.device) if quantization else "cpu", dtype=getattr(args, "dtype", "auto"),
                            quantization=quantization)
        model, fingerprint = loaded.model, loaded.fingerprint
        processing_class = processing_class if processing_class is not None else loaded.tokenizer
    if processing_class is None:
        name = getattr(unwrapped(model).config, "_name_or_path", None)
        if not name:
            raise PactError("PactTrainer needs processing_class= (the tokenizer) for a model that names no folder or hub id")
        processing_class = load_tokenizer(name)
    reference = _reference(model, processing_class, fingerprint, args)
    train_cache = _cache_of("train_dataset", train_dataset, cache, getattr(args, "cache", None), getattr(args, "data", None),
                            reference, args, objective)
    if train_cache is None:
        raise PactError("PactTrainer needs training data: train_dataset= (a datasets.Dataset, a data file or a cache) or "
                        "cache=, or args.cache / args.data")
    evaluation = _cache_of("eval_dataset", eval_dataset, eval_cache, getattr(args, "eval_cache", None), None, reference, args,
                           objective)
    if peft_config is not None:
        if hasattr(model, "peft_config"):
            raise PactError("peft_config= was given for a model that already has peft adapters: pass the base model, or "
                            "the wrapped model without peft_config")
        set_seed(args.seed)  # the adapters' initialisation, as the Trainer seeds its own model init
        model = with_peft_config(model, peft_config, bool(getattr(args, "gradient_checkpointing", False)),
                                 getattr(args, "gradient_checkpointing_kwargs", None))
    return TrainerInputs(model, processing_class, train_cache, evaluation, reference.fingerprint)


def _reference(model, tokenizer, fingerprint: str | None, args) -> LoadedModel:
    """The model as the reference a cache is built from (its adapters, if any, are switched off for that)."""
    name = str(getattr(unwrapped(model).config, "_name_or_path", "") or "model held in memory")
    return LoadedModel(model=model, tokenizer=tokenizer, source=name, path=Path(name),
                       fingerprint=fingerprint or model_fingerprint(model), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))


def _cache_of(argument: str, dataset, cache, args_cache, args_data, reference: LoadedModel, args,
              objective: ObjectiveArguments) -> CacheReader | None:
    """The cache one of the trainer's datasets stands for: `cache`, or a cache given as `dataset`, else data given as
    `dataset` (or `args_data`) made into its cache (in `args_cache` when given), else the cache `args_cache`."""
    if cache is not None and dataset is not None:
        raise PactError(f"{argument}= and a cache were both given: pass the training data once (a cache is also accepted "
                        f"as {argument}=)")
    if cache is not None:
        return _open_cache(cache)
    if dataset is None and args_data is None:
        return None if args_cache is None else _open_cache(args_cache)
    if dataset is not None and _is_cache(dataset):
        return _open_cache(dataset)
    data = dataset if dataset is not None else args_data
    settings = args if isinstance(args, ExampleArguments) else ExampleArguments()
    source = args if isinstance(args, DataSourceArguments) else DataSourceArguments()
    progress = not getattr(args, "disable_tqdm", False)
    if is_quantized(reference.model):
        raise PactError(f"{argument}= is data, whose reference cache is built from the model given, and that model is "
                        "quantised: its targets would be the quantised model's, not the reference's. Build the cache from "
                        "the unquantised model (`pact-cache build --model NAME --data ...`, or `pact train --data` with "
                        "--load_in_4bit, which does) and pass it as the dataset")
    reference.model.to(args.device)
    return cache_from_data(data, reference, settings, source, objective, cache=args_cache, progress=progress)


def _is_cache(value) -> bool:
    """Whether a trainer argument is a cache: a `CacheReader`, or a folder holding a cache's manifest."""
    return isinstance(value, CacheReader) or (isinstance(value, (str, Path)) and (Path(value).expanduser() / MANIFEST_NAME).is_file())


def _open_cache(value) -> CacheReader:
    """A `CacheReader` of a cache argument."""
    return value if isinstance(value, CacheReader) else CacheReader(value)

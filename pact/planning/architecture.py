"""The models a plan measures, built from an architecture alone: a config read from a shipped name, a config.json, a
model directory or a hub id; the causal LM on the meta device (no weights read), set up for training as `pact train`
sets it up.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from pact.errors import InvalidSetting, PactError
from pact.models.adapters import adapt_for_training
from pact.models.loading import resolve_model_path
from pact.planning.arguments import PlanArguments
from pact.planning.packed_weights import pack_linear_layers

MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"  # shipped architectures: `--model NAME` for NAME.json


# The sizes of an architecture a plan checks before building any module, with their bounds (lowest, highest): far beyond
# any model's, and small enough that no meta tensor's byte count overflows and the modules of the layers (and experts)
# fit in host memory. A size may also be a list of them (one per layer).
SIZE_BOUNDS = {**dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                "head_dim", "moe_intermediate_size"), (1, 1 << 24)),
               "num_hidden_layers": (1, 1024), "max_position_embeddings": (1, 1 << 40),
               **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), (0, 1024))}


def shipped_models() -> list[str]:
    """The architecture names shipped with the project (`--model NAME`)."""
    return sorted(p.stem for p in MODEL_CONFIGS.glob("*.json"))


def load_architecture(model: str):
    """The transformers config of `model`: a shipped name, a config.json file, a model directory, a `.gguf` file, the
    embedded model's name or a hub id (read from the hub or its local cache). No weights are read. `InvalidSetting`
    naming `model` when it is none of these, or its architecture is one no model has (`check_architecture`)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    shipped = MODEL_CONFIGS / f"{model}.json"
    path = shipped if shipped.is_file() else Path(model).expanduser()
    if path.suffix == ".json":
        return check_architecture(_config_file(model, path), model)
    if path.is_file() and path.suffix != ".gguf":
        raise InvalidSetting("model", f"model {model!r}: a file, but neither a config.json nor a .gguf model")
    try:
        _, location = resolve_model_path(model)
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError, PactError) as err:
        raise InvalidSetting("model", f"model {model!r}: no architecture could be read from it ({err}); give a model "
                                      f"directory, a config.json file, a hub id or one of {', '.join(shipped_models())}") from err
    except (StrictDataclassError, TypeError, KeyError, ArithmeticError) as err:  # the values, refused by transformers' checks
        raise InvalidSetting("model", f"model {model!r}: its config.json is not one transformers accepts ({_one_line(err)})") from err
    return check_architecture(config, model)


def _one_line(err: BaseException) -> str:
    """An error's message on one line (transformers' validation errors span several)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def check_architecture(config, model: str):
    """Refuse, naming `model` and the field, an architecture no model has, before any module is built: a size
    (`SIZE_BOUNDS`) that is not an integer within its bounds, attention heads that do not divide the hidden size or each
    other, or a number that is not finite. Returns `config`."""
    fields = config.to_dict()
    for name, value in [*fields.items(), *((f"{key}.{sub}", item) for key, value in fields.items()
                                           if isinstance(value, dict) for sub, item in value.items())]:
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidSetting("model", f"model {model!r}: {name} is {value}, not a finite number")
    for name, (low, high) in SIZE_BOUNDS.items():
        value = fields.get(name)
        sizes = value if isinstance(value, list) and value else [value]
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in sizes):
            raise InvalidSetting("model", f"model {model!r}: {name} must be an integer from {low} to {high} (or a list of them), "
                                          f"got {value!r}")
    heads, kv_heads, hidden = (fields.get(name) if isinstance(fields.get(name), int) else None
                               for name in ("num_attention_heads", "num_key_value_heads", "hidden_size"))
    if heads and hidden and not fields.get("head_dim") and hidden % heads:
        raise InvalidSetting("model", f"model {model!r}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if heads and kv_heads and heads % kv_heads:
        raise InvalidSetting("model", f"model {model!r}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                                      f"{kv_heads}")
    return config


def _config_file(model: str, path: Path):
    """The transformers config held by the JSON file `path` (`InvalidSetting` naming `model` otherwise)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InvalidSetting("model", f"model {model!r}: cannot read it ({err.strerror or err})") from err
    except (ValueError, RecursionError) as err:
        raise InvalidSetting("model", f"model {model!r}: not valid JSON ({type(err).__name__}: {err})") from err
    if not isinstance(values, dict) or "model_type" not in values:
        raise InvalidSetting("model", f"model {model!r}: not a transformers config.json (no model_type field)")
    try:
        return AutoConfig.for_model(**values)
    except (ValueError, KeyError, TypeError, ArithmeticError, StrictDataclassError) as err:  # refused by transformers' checks
        raise InvalidSetting("model", f"model {model!r}: transformers cannot build a config from it ({_one_line(err)})") from err


def meta_model(config, args: PlanArguments):
    """The causal LM of `config` on the meta device, in `args.dtype`, its linear layers packed for a quantisation."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=args.torch_dtype)
    except (ValueError, TypeError, KeyError, ArithmeticError, RuntimeError) as err:  # the config's values, refused by transformers
        raise InvalidSetting("model", f"model {args.model!r}: transformers cannot build this architecture ({_one_line(err)})") from err
    if args.quantization:
        pack_linear_layers(model, args.quantization, args.torch_dtype)
    return model


def trainable_model(model, args: PlanArguments):
    """`model` set up for training as `pact train` sets it up (`pact.models.adapters.adapt_for_training`, then the Trainer's
    non-reentrant gradient checkpointing). A LoRA dropout above 0 keeps a dropout mask per adapted layer, which the plan counts."""
    checkpointing = {"use_reentrant": False}
    model = adapt_for_training(model, args, args.gradient_checkpointing, checkpointing)
    if args.gradient_checkpointing:
        enable_checkpointing(model, checkpointing)
    return model


def enable_checkpointing(model, kwargs: dict) -> None:
    """Turn on gradient checkpointing as the Trainer does (`activation_checkpointing_enable` where transformers has it)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def frozen_reference(model):
    """`model` as online PACT's reference: every parameter frozen, in eval mode."""
    model.requires_grad_(False)
    return model.eval()


def architecture_summary(config) -> dict:
    """The model's class, parameter count (unquantised) and main sizes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _quiet():
        model = AutoModelForCausalLM.from_config(config)
    return {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": getattr(config, "num_hidden_layers", None), "hidden_size": getattr(config, "hidden_size", None),
            "vocab_size": getattr(config, "vocab_size", None)}


@contextlib.contextmanager
def _quiet():
    """Silence transformers' and peft's advice meant for real training (checkpointing and cache notices) while planning."""
    import warnings

    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)

"""Adapters: the LoRA / quantization settings a run trains with (declared once, for `pact train` and `pact plan`),
setting a model up for training with them, and loading a saved PEFT adapter folder onto its base model.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pact.checks import check_setting
from pact.errors import InvalidSetting, PactError
from pact.files import atomic_write
from pact.models.loading import EMBEDDED_MODEL, load_model
from pact.models.quantization import is_quantized

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RUN_RECORD = "pact_config.json"  # the settings `pact train` records beside its adapter (the run folder's RUN_CONFIG)
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model the embedded GGUF (Q4_1) was quantised from


@dataclass
class AdapterArguments:
    """What a run trains, declared once for `pact train` and `pact plan`: LoRA adapters (peft) on a plain or a
    bitsandbytes-quantised base (QLoRA), or every weight (`full`). Construction refuses settings no run can use
    (`InvalidSetting` naming the field); `adapt_for_training` applies them to a model."""

    full: bool = field(default=False, metadata={"help": "full fine-tuning instead of LoRA"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: LoRA on the base's linear layers quantised to 4-bit NF4 by bitsandbytes (the qlora extra; "
                "docs/commands.md#qlora), the LM head and embeddings unquantised"})
    load_in_8bit: bool = field(default=False, metadata={"help": "like --load_in_4bit with LLM.int8() 8-bit linear layers"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "aliases": ["--lora-targets"], "help": "what LoRA adapts, in peft's terms (LoraConfig's target_modules): module names "
                                                "or dotted name suffixes (space- or comma-separated), `all-linear` (every linear "
                                                "layer but the output head), or one regular expression matched against a module's "
                                                "full name (e.g. '.*\\.(q|v)_proj')"})

    @property
    def quantization(self) -> str | None:
        """`4bit` or `8bit` for a quantised (QLoRA) base, None for a plain one."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    def check_adapter_settings(self) -> None:
        """Write `lora_target_modules` as a plain list (comma-separated items split) and refuse a value no run can use:
        a rank below 1, a non-positive alpha, a dropout outside [0, 1), no target module for LoRA, both quantisations,
        or a quantised base with full fine-tuning."""
        self.lora_target_modules = [t.strip() for item in self.lora_target_modules or []
                                    for t in (str(item).split(",") if not is_target_pattern(str(item)) else [str(item)]) if t.strip()]
        check_target_forms(self.lora_target_modules)
        check_setting("lora_r", self.lora_r, 1, integer=True)
        check_setting("lora_alpha", self.lora_alpha, 0, low_open=True)
        check_setting("lora_dropout", self.lora_dropout, 0, 1, high_open=True)
        if not self.full and not self.lora_target_modules:
            raise InvalidSetting("lora_target_modules", "lora_target_modules must name at least one module (e.g. q_proj v_proj)")
        if self.load_in_4bit and self.load_in_8bit:
            raise InvalidSetting("load_in_8bit", "load_in_4bit and load_in_8bit exclude each other; choose one")
        if self.quantization and self.full:
            name = f"load_in_{self.quantization}"
            raise InvalidSetting(name, f"{name} trains LoRA adapters on a frozen quantised base (QLoRA), and full "
                                       f"fine-tuning cannot update quantised weights; drop --full, or drop {name} to "
                                       "fine-tune every weight")


ALL_LINEAR = "all-linear"  # peft's shorthand for every linear layer but the output head
PATTERN_CHARACTERS = frozenset("*+?|()[]{}^$\\")  # a target holding one is a regular expression (peft's string form)


def is_target_pattern(target: str) -> bool:
    """Whether a LoRA target is a regular expression rather than a module name or dotted suffix."""
    return any(character in PATTERN_CHARACTERS for character in target)


def check_target_forms(targets: list[str]) -> None:
    """Refuse a combination peft cannot take: `all-linear` or a regular expression beside other targets (peft takes a list
    of names, or one string), or a regular expression that does not compile."""
    special = [t for t in targets if t.lower() == ALL_LINEAR or is_target_pattern(t)]
    if special and len(targets) > 1:
        raise InvalidSetting("lora_target_modules", f"lora_target_modules {special[0]!r} stands alone (peft takes either a list of "
                                                    f"module names or one string: all-linear or a regular expression), got "
                                                    f"{' '.join(targets)}")
    for target in special:
        if target.lower() != ALL_LINEAR:
            try:
                re.compile(target)
            except re.error as err:
                raise InvalidSetting("lora_target_modules", f"lora_target_modules {target!r} is not a valid regular "
                                                            f"expression ({err})") from err


def peft_target_modules(targets: list[str]) -> str | list[str]:
    """What `LoraConfig(target_modules=)` gets for `lora_target_modules`: the one string (`all-linear` or a regular
    expression) as a string, names as a list."""
    if len(targets) == 1 and (targets[0].lower() == ALL_LINEAR or is_target_pattern(targets[0])):
        return targets[0]
    return list(targets)


def full_model_weights(folder: Path) -> list[Path]:
    """The weight files of a full Hugging Face model in `folder` (model*.safetensors, pytorch_model*.bin), not an adapter's."""
    return sorted(p for pattern in ("model*.safetensors", "pytorch_model*.bin") for p in folder.glob(pattern) if p.is_file())


def _is_number(value, low: float, high: float = math.inf, integer: bool = False) -> bool:
    """A finite number (an int with `integer`; never a bool) in [low, high)."""
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and low <= value < high


# The fields of a LoRA adapter_config.json peft reads, and what each must hold: a field edited by hand is named
# instead of failing inside peft (or, as a NaN alpha does, merging NaN into every weight without a word).
LORA_FIELDS = (
    ("r", lambda v: _is_number(v, 1, integer=True), "an integer >= 1"),
    ("lora_alpha", lambda v: _is_number(v, 0) and v > 0, "a finite number > 0"),
    ("lora_dropout", lambda v: v is None or _is_number(v, 0, 1), "a finite number >= 0 and < 1"),
    ("target_modules", lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(m, str) for m in v)),
     "a module name or a list of them"),
    ("base_model_name_or_path", lambda v: v is None or isinstance(v, str), "a model name or path (text)"),
)


def _adapter_config_problem(config_file: Path) -> str | None:
    """What is wrong with an adapter's adapter_config.json (not a JSON object, no known `peft_type`, a LoRA field that
    is not what peft reads: `LORA_FIELDS`), or None."""
    from peft import PeftType

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        return f"not valid JSON ({err})"
    if not isinstance(config, dict):
        return "not a JSON object"
    if config.get("peft_type") not in {t.value for t in PeftType}:
        return f"field 'peft_type' is {config.get('peft_type')!r}, expected the name of a PEFT method such as 'LORA'"
    if config["peft_type"] == PeftType.LORA.value:
        bad = next(((name, rule) for name, valid, rule in LORA_FIELDS if name in config and not valid(config[name])), None)
        if bad is not None:
            return f"field '{bad[0]}' must be {bad[1]}, got {json.dumps(config[bad[0]])}"
    return None


def check_adapter_dir(adapter: str | Path, flag: str = "--adapter") -> list[Path]:
    """Refuse an adapter folder peft cannot load from disk, without touching the network; returns the files it reads.
    `flag` is how the command named the folder (`--adapter`, or `pact export`'s `RUN`).

    Without this, peft takes a folder missing a file for a hub id and tries
    the hub. A full fine-tuned model folder (model weights, no
    adapter_config.json) is pointed to `--model`.
    """
    folder = Path(adapter).expanduser()
    if not folder.exists():
        raise PactError(f"{flag} {adapter}: no such directory")
    if not folder.is_dir():
        raise PactError(f"{flag} {adapter}: a file, not an adapter directory (one holding {ADAPTER_CONFIG} and "
                        f"{ADAPTER_WEIGHTS[0]}, e.g. a `pact train --out` directory)")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        model_weights = full_model_weights(folder)
        if model_weights:
            raise PactError(f"{flag} {adapter}: no {ADAPTER_CONFIG} but {model_weights[0].name}, so this "
                            "folder holds a full model (e.g. `pact train --full`), not a PEFT adapter; pass it as --model instead")
        raise PactError(f"{flag} {adapter}: no {ADAPTER_CONFIG} in this folder, so it is not a PEFT adapter")
    problem = _adapter_config_problem(config_file)
    if problem:
        raise PactError(f"{config_file}: {problem}; this adapter folder ({flag} {adapter}) cannot be loaded")
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise PactError(f"{flag} {adapter}: no {ADAPTER_WEIGHTS[0]} (or {ADAPTER_WEIGHTS[1]}) in this folder; "
                        "the adapter's weights are missing")
    return [config_file, *weights]


def _first_reason(err: Exception) -> str:
    """The telling line of a loading error: the first size mismatch torch reports, else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return next((line for line in lines if line.startswith("size mismatch")), lines[0])


def _apply_adapter(loaded, adapter: str, flag: str) -> None:
    """Put the PEFT adapter folder `adapter` (named `flag` on the command line) on `loaded.model`; unreadable weights, or
    an adapter made for another model, are a `PactError`."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        loaded.model = PeftModel.from_pretrained(loaded.model, str(Path(adapter).expanduser())).eval()
    except SafetensorError as err:
        raise PactError(f"{flag} {adapter}: {ADAPTER_WEIGHTS[0]} is not a readable safetensors file ({err}); "
                        "save the adapter again") from err
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as err:
        raise PactError(f"{flag} {adapter} cannot be applied to --model {loaded.source}: {_first_reason(err)} "
                        "(an adapter fits only the base model it was trained on: pass that one as --model)") from err


def share_base_model(folder: Path, source: str) -> None:
    """Make the adapter_config.json saved in `folder` (by a run that loaded the model `source`) name its base as others
    load it: the embedded model by its hub id, not its converted folder (a path with a hash, on this machine only).

    Done once the adapter is saved, not on the peft config before: peft's
    save looks a hub id up on the hub, a warning at every checkpoint
    offline. A model loaded by hub id is recorded by that id and a local
    folder by its path already; a full model (no adapter_config.json) is left
    as it is.
    """
    config_file = Path(folder) / ADAPTER_CONFIG
    if source != EMBEDDED_MODEL or not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = EMBEDDED_HUB_ID
    atomic_write(config_file, json.dumps(config, indent=2, sort_keys=True).encode())


def _in_hub_cache(hub_id: str) -> bool:
    """Whether the local Hugging Face cache holds the hub model `hub_id` (its config.json), without asking the hub."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def loadable_base_name(name: str) -> str:
    """A recorded base model name as this machine loads it: the embedded model's hub id (`share_base_model`) stands for
    the embedded model unless the local Hugging Face cache holds the hub model itself; any other name is unchanged."""
    return EMBEDDED_MODEL if name == EMBEDDED_HUB_ID and not _in_hub_cache(name) else name


def recorded_text(path: Path, key: str) -> str | None:
    """The text field `key` of the JSON object in `path` (None when absent or empty); `PactError` naming the file when
    it is not a JSON object or the field is not text."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise PactError(f"{path}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict):
        raise PactError(f"{path}: not a JSON object")
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise PactError(f"{path}: field '{key}' must be a model name or path (text), got {json.dumps(value)}")
    return value or None


def recorded_base_model(adapter: str | Path) -> str | None:
    """The base model an adapter folder records, as written: its run's `pact_config.json` `model_source` (what
    `pact train` loaded, e.g. `smollm2-135m-instruct`), else adapter_config.json's `base_model_name_or_path` (any peft
    adapter; `share_base_model`), else None."""
    folder = Path(adapter).expanduser()
    record = folder / RUN_RECORD
    source = recorded_text(record, "model_source") if record.is_file() else None
    return source or recorded_text(folder / ADAPTER_CONFIG, "base_model_name_or_path")


def adapter_base_model(adapter: str | Path, flag: str = "--adapter") -> str:
    """The base model the adapter folder `adapter` was trained on (`recorded_base_model`), as this machine loads it
    (`loadable_base_name`); a `PactError` when the folder names none, since an adapter fits only its own base."""
    name = recorded_base_model(adapter)
    if name is None:
        raise PactError(f"{flag} {adapter}: neither {RUN_RECORD} (model_source) nor {ADAPTER_CONFIG} "
                        "(base_model_name_or_path) names the base model the adapter was trained on; pass it as --model")
    return loadable_base_name(name)


def _model_identity(name: str) -> str:
    """What a model name stands for, for comparing two names: the embedded model's name, a local path made absolute,
    else the name itself (a hub id)."""
    name = loadable_base_name(name)
    path = Path(name).expanduser()
    return name if name == EMBEDDED_MODEL or not path.exists() else str(path.resolve())


def base_for_adapter(model_source: str | None, adapter: str, flag: str = "--adapter") -> str:
    """The model to apply a checked adapter folder to: `model_source` when given, else the adapter's own base
    (`adapter_base_model`).

    A `model_source` other than the base the adapter records is used as
    asked, with a warning on stderr naming both, not refused: names cannot
    tell the same weights apart (a moved folder, a copy, the hub id and the
    embedded model), the recorded base may not exist here, and an adapter
    whose shapes do not fit the model is refused when it is applied.
    """
    if model_source is None:
        return adapter_base_model(adapter, flag)
    recorded = recorded_base_model(adapter)
    if recorded is not None and _model_identity(recorded) != _model_identity(model_source):
        print(f"warning: --model {model_source} is not the base model {flag} {adapter} was trained on ({recorded}); "
              "applying the adapter to --model as asked (drop --model to use the adapter's base)", file=sys.stderr)
    return model_source


def load_student(model_source: str | None, adapter: str | None = None, device: str = "auto", dtype: str = "auto",
                 flag: str = "--adapter"):
    """Load a model with weights in `dtype` (see `pact.devices.resolve_dtype`) and optionally apply a PEFT adapter directory
    on top (checked first: see `check_adapter_dir`; `flag` is how the command named it).

    Without `model_source`: the adapter's own base model (`base_for_adapter`),
    or the embedded model when there is no adapter.
    """
    if adapter:
        check_adapter_dir(adapter, flag)
        model_source = base_for_adapter(model_source, adapter, flag)
    loaded = load_model(model_source, device=device, dtype=dtype)
    if adapter:
        _apply_adapter(loaded, adapter, flag)
    return loaded


def _adaptable_modules(model) -> list[str]:
    """Qualified names of the modules of `model` LoRA can adapt (linear, embedding and convolution layers)."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def _linear_modules(model) -> list[str]:
    """What peft's `all-linear` adapts in `model`: its linear layers less the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head]


def check_lora_targets(model, targets: list[str]) -> None:
    """Refuse `lora_target_modules` that name no adaptable module of `model`, as peft matches them: a name against a
    module's name or its dotted suffix, one regular expression against the full name (every module it matches must be
    one LoRA can adapt), `all-linear` against the linear layers but the head; naming the culprit and what would work."""
    names = _adaptable_modules(model)
    target = peft_target_modules(targets)
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        if not _linear_modules(model):
            raise InvalidSetting("lora_target_modules", "lora_target_modules all-linear: the model has no linear layer but its "
                                                        "output head")
        return
    if isinstance(target, str):
        matched = [name for name, _ in model.named_modules() if name and re.fullmatch(target, name)]
        others = [name for name in matched if name not in set(names)]
        if not matched or others:
            example = next((n for n in names if n.endswith("q_proj")), names[0] if names else "")
            found = (f"it matches {others[0]!r}, which LoRA cannot adapt" if others else "it matches no module's full name")
            raise InvalidSetting("lora_target_modules", f"lora_target_modules {target!r}: {found} (the pattern must match whole "
                                                        f"names of linear or embedding layers, such as {example!r})")
        return
    unknown = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if unknown:
        candidates = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise InvalidSetting("lora_target_modules", f"lora_target_modules names no module of the model: {', '.join(map(repr, unknown))} "
                                                    f"(modules LoRA can adapt there: {', '.join(candidates[:12])}; or all-linear, "
                                                    "or one regular expression over full module names)")


def adapt_for_training(model, settings: AdapterArguments, gradient_checkpointing: bool, checkpointing_kwargs: dict | None):
    """`model` as `pact train` trains it (and `pact plan` measures it) under `settings`: itself (`full`) or wrapped with
    LoRA adapters (targets checked first), a quantised base prepared by peft for k-bit training first (frozen, norms and
    head in float32). Gradient checkpointing itself is turned on by the Trainer (or the planner)."""
    from peft import LoraConfig

    if gradient_checkpointing:
        model.config.use_cache = False
    if settings.full:
        return model
    check_lora_targets(model, settings.lora_target_modules)
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=peft_target_modules(settings.lora_target_modules), task_type="CAUSAL_LM")
    return with_peft_config(model, lora, gradient_checkpointing, checkpointing_kwargs)


def with_peft_config(model, peft_config, gradient_checkpointing: bool = False, checkpointing_kwargs: dict | None = None):
    """`model` wrapped by peft with `peft_config` (any `peft.PeftConfig`, as TRL's trainers take it), a quantised base
    prepared for k-bit training first (frozen, norms and head in float32), as peft documents for QLoRA."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                        gradient_checkpointing_kwargs=checkpointing_kwargs)
    return get_peft_model(model, peft_config)

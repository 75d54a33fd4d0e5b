"""Reusable builders for unit tests: a tiny ChatML tokenizer, tiny random Llama
models (as a Hugging Face directory or a `.gguf` file) and data-file writers.

Everything here is built locally in well under a second; nothing needs the hub.
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

# SmolLM2-Instruct's ChatML template, with the default system message made a parameter.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' and DEFAULT_SYSTEM %}"
    "{{ '<|im_start|>system\\n' + DEFAULT_SYSTEM + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_SYSTEM = "You are a tiny test assistant."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 384

# Words the chat template and typical test rows use, so they get whole-word pieces.
_EXTRA_CORPUS = [
    "system user assistant",
    "You are a tiny test assistant.",
    "Say hello. Hello there! What is two plus two? Four.",
    "Translate to French: good morning. Bonjour.",
]


def chatml_template(default_system: str | None = TINY_SYSTEM) -> str:
    """A SmolLM2-style ChatML chat template; `default_system=None` adds no system turn."""
    value = json.dumps(default_system) if default_system else "''"
    return "{% set DEFAULT_SYSTEM = " + value + " %}" + _CHATML_TEMPLATE


@functools.lru_cache(maxsize=None)
def _tiny_backend_json(vocab_size: int) -> str:
    """Train (once per process) a byte-level BPE on the demo data; returns its `tokenizer.json` text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pact.data.sources import DEMO_BENIGN, DEMO_REFUSALS, demo_data_path

    corpus = list(_EXTRA_CORPUS)
    for name in (DEMO_BENIGN, DEMO_REFUSALS):
        with open(demo_data_path(name), encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    corpus.extend(str(v) for v in row.values() if isinstance(v, str))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return backend.to_str()


def make_tiny_tokenizer(default_system: str | None = TINY_SYSTEM, vocab_size: int = TINY_VOCAB_SIZE):
    """A `PreTrainedTokenizerFast`: byte-level BPE (~384 tokens, any text encodes), ChatML template.

    Special tokens as in SmolLM2: `<|endoftext|>` (id 0, unk), `<|im_start|>` (id 1, bos),
    `<|im_end|>` (id 2, eos and pad).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_backend_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = chatml_template(default_system)
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides):
    """The tiny `LlamaConfig` every unit test uses (2 layers, hidden 32, GQA 4/2, tied embeddings)."""
    from transformers import LlamaConfig

    settings = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def make_tiny_model(tmp_dir, vocab_size: int | None = None, seed: int = 0, tokenizer=None, **config) -> Path:
    """Save a random tiny `LlamaForCausalLM` and its tokenizer to `tmp_dir`; returns the directory.

    `vocab_size` defaults to `len(tokenizer)`; `seed` fixes the weights (different seeds, different
    weights); `config` overrides `tiny_llama_config`'s settings. The directory loads with
    `pact.models.loading.load_model(str(dir))`.
    """
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else make_tiny_tokenizer()
    out = Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size or len(tokenizer), **config)).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _permute_qk(weights, n_head: int):
    """llama.cpp's rotary permutation of q/k rows (transformers undoes it when reading a GGUF)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_gguf(model_dir, path) -> Path:
    """Write the tiny model in `model_dir` (from `make_tiny_model`) as a float32 `.gguf` file at `path`.

    Written the way llama.cpp's converter does (llama architecture, gpt2 byte-level vocabulary,
    permuted q/k), so loading it with `gguf_file=` gives back the same weights and tokenizer.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    model_dir, path = Path(model_dir), Path(path)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    for added in backend["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        data = np.ascontiguousarray(tensor, dtype=np.float32)
        if name.endswith("attn_q.weight"):
            data = _permute_qk(data, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = _permute_qk(data, config.num_key_value_heads)
        writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_jsonl(path, rows) -> Path:
    """Write `rows` (dicts, or raw strings written verbatim as lines) as JSON Lines; returns the path."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_json(path, rows) -> Path:
    """Write `rows` as one JSON array; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_csv(path, rows, fieldnames=None) -> Path:
    """Write dict `rows` as CSV with a header (missing values are empty cells); returns the path."""
    path = Path(path)
    fieldnames = fieldnames or list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows) -> Path:
    """Write dict `rows` as a Parquet file; returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_dataset_dir(path, rows) -> Path:
    """Save dict `rows` as a `datasets.Dataset` folder with `save_to_disk`; returns the folder."""
    from datasets import Dataset

    path = Path(path)
    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def random_lora_student(model, seed: int = 0, scale: float = 0.02):
    """A copy of `model` with LoRA (r=4 on q_proj, v_proj) whose B matrices are random, so the adapter changes outputs.

    Fresh LoRA adapters start at zero (an unchanged model); tests of gradients and drift need a student that differs.
    """
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    student = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    return student

"""Models: loading (local folders, hub ids, `.gguf` files, the embedded default), quantization, the parts of a causal
LM the objective reads, LoRA adapters, and export. The bottom layer with `pact.data`."""

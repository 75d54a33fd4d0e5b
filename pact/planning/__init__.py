"""Planning: will a training step fit? The peak device memory of one optimizer step, measured on meta tensors from a
model's architecture alone, and the automatic gradient-checkpointing choice of `pact train`."""

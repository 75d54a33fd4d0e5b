"""Training: `PactTrainingArguments`, `PactTrainer` (the one training loop, a `transformers.Trainer`), its data
loader parts, callbacks, the run folder, and `train()`, the Python entry point behind `pact train`."""

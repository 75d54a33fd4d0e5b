"""`pact train` says, once as training starts, what the logged `kl` measures and why it is not 0 at step 1."""

from __future__ import annotations

from pact.cli.main import main as pact_main
from pact.training.callbacks import kl_explanation_of


def test_the_first_line_of_training_explains_kl(float32_cache, tmp_path, capsys):
    """The explanation is printed once, before the run's summary, for PACT's KL; the reference KL's says it starts near 0."""
    assert pact_main(["train", "--cache", str(float32_cache), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
                      "--per_device_train_batch_size", "4", "--train_device", "cpu", "--disable_tqdm", "true",
                      "--logging_steps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    explanation = kl_explanation_of("pact")
    assert lines.count(explanation) == 1 and lines.index(explanation) < next(i for i, l in enumerate(lines) if l.startswith("trained"))
    assert "above 0 from step 1" in explanation and "not to the reference itself" in explanation
    assert "starts near 0" in kl_explanation_of("refkl+tokenwise")

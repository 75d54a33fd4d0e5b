"""Which `transformers.TrainingArguments` fields a PACT run honours, refuses or has no use for: every field is placed in
exactly one set (pact.training.arguments), so a field a new transformers release adds fails here until it is placed,
and each refused field is refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

from pact.errors import InvalidSetting
from pact.training.arguments import (TRAINER_NOT_APPLICABLE, TRAINER_REFUSED, TRAINER_SUPPORTED, PactTrainingArguments,
                                     check_trainer_fields)

SETS = {"supported": set(TRAINER_SUPPORTED), "refused": set(TRAINER_REFUSED), "not applicable": set(TRAINER_NOT_APPLICABLE)}
# placed fields that the lowest transformers pyproject.toml allows (5.18) does not have yet: absent there, not stale
ADDED_SINCE_FLOOR = {"activation_checkpointing", "activation_checkpointing_kwargs"}

# a value other than the one PACT's loop behaves as, per refused field
OTHER_VALUES = {
    "label_smoothing_factor": 0.1, "average_tokens_across_devices": False, "train_sampling_strategy": "group_by_length",
    "data_seed": 7, "dataloader_drop_last": True, "dataloader_multiprocessing_context": "spawn", "dataloader_in_order": False,
    "accelerator_config": {"split_batches": True}, "parallelism_config": object(), "per_device_eval_batch_size": 2,
    "bf16_full_eval": True, "fp16_full_eval": True, "auto_find_batch_size": True, "include_num_input_tokens_seen": "all",
    "use_liger_kernel": True, "liger_kernel_config": {"rope": True}, "load_best_model_at_end": True,
}


def test_every_training_argument_is_in_exactly_one_set():
    fields = [f.name for f in dataclasses.fields(transformers.TrainingArguments)]
    unplaced = [name for name in fields if not any(name in names for names in SETS.values())]
    assert not unplaced, f"place each in TRAINER_SUPPORTED, TRAINER_REFUSED or TRAINER_NOT_APPLICABLE: {unplaced}"
    twice = [name for name in fields if sum(name in names for names in SETS.values()) > 1]
    assert not twice, f"in more than one set: {twice}"
    stale = sorted(set().union(*SETS.values()) - set(fields) - ADDED_SINCE_FLOOR)
    assert not stale, f"no field of transformers.TrainingArguments {transformers.__version__}: {stale}"


def test_each_refused_field_keeps_the_value_the_loop_behaves_as():
    """The defaults are accepted: a refused field refuses only a value the PACT loop would ignore."""
    defaults = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}
    for name, (expected, reason) in TRAINER_REFUSED.items():
        assert defaults[name] == expected, name
        assert reason
    assert set(OTHER_VALUES) == set(TRAINER_REFUSED)


@pytest.mark.parametrize("name", sorted(TRAINER_REFUSED))
def test_a_refused_field_is_named_with_the_reason(name, tmp_path):
    class Args:
        pass

    args = Args()
    setattr(args, name, OTHER_VALUES[name])
    with pytest.raises(InvalidSetting) as err:
        check_trainer_fields(args)
    assert err.value.field == name
    assert str(err.value).startswith(f"{name} {OTHER_VALUES[name]!r} would be ignored by a PACT run: {TRAINER_REFUSED[name][1]}")


def test_construction_refuses_label_smoothing_and_accepts_the_defaults(tmp_path):
    with pytest.raises(InvalidSetting, match="label_smoothing_factor 0.1 would be ignored by a PACT run"):
        PactTrainingArguments(output_dir=str(tmp_path), train_device="cpu", label_smoothing_factor=0.1)
    assert PactTrainingArguments(output_dir=str(tmp_path), train_device="cpu", label_smoothing_factor=0).label_smoothing_factor == 0
    assert PactTrainingArguments(output_dir=str(tmp_path), train_device="cpu", include_num_input_tokens_seen=False)

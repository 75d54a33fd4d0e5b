"""One optimizer step measured: the peak of live tensor bytes, by category, of the project's real training step for
plain SFT, cached PACT, online PACT, cached KD and online KD, on meta tensors (a plan) or on real ones (what the tests
check the plan against).
"""

from __future__ import annotations

import dataclasses

import torch

from pact.data.batch import collate_spans
from pact.errors import InvalidSetting
from pact.models.parts import decoder_stack, head_device
from pact.data.batch import collate_rows
from pact.objective.distillation import OnlineTeacher
from pact.objective.loss import cached_pact_loss, pact_batch_loss
from pact.objective.settings import ObjectiveArguments
from pact.objective.student import student_outputs
from pact.objective.targets import OnlineTargets
from pact.planning.memory import LiveTensorBytes, Peak, tensors_in

VARIANTS = {"sft": "plain SFT", "cached_pact": "cached PACT", "online_pact": "online PACT", "cached_kd": "cached KD",
            "online_kd": "online KD"}
KD_VARIANTS = ("cached_kd", "online_kd")  # distillation: the teacher's top-K from the cache's rows, or from a teacher in memory
REFERENCE_VARIANTS = ("online_pact", "online_kd")  # a second, frozen model (reference or teacher) runs in the step
HEADER_TOKENS = 4  # the assistant header that opens online PACT's post-only contexts (3 to 5 tokens in chat templates)


SYNTHETIC_BATCH_LIMIT = 8 << 30  # bytes of host memory the synthetic micro-batch of a plan may take


ROW_OVERHEAD = 4096  # bytes of Python objects per synthetic row, beyond its tensors' data


def synthetic_batch_bytes(batch_size: int, max_length: int, prompt_length: int, num_safety: int,
                          reference_kl: bool = False, kd_top_k: int = 0) -> int:
    """The host memory `synthetic_rows` takes: per row its token ids, its targets on the safety tokens (and a teacher's
    top-K) per response step, and the objects holding them."""
    steps = max_length - prompt_length
    per_step = 8 * num_safety + 24 + (4 * num_safety + 4 if reference_kl else 0) + 12 * kd_top_k + 4
    return batch_size * (ROW_OVERHEAD + 8 * max_length + steps * per_step + 16 * num_safety)


def synthetic_rows(batch_size: int, max_length: int, prompt_length: int, vocab_size: int, num_safety: int,
                   reference_kl: bool = False, kd_top_k: int = 0) -> list[dict]:
    """A micro-batch of cache rows (`CacheReader` items) of the planned shape: `max_length` tokens each, the response
    after the first `prompt_length`, targets on `num_safety` safety tokens (with `reference_kl`, also what the
    reference KL reads: the logits on all of S and the log-mass outside S; with `kd_top_k` K, a teacher's top-K ids,
    log-probs and tail). The values are arbitrary but valid.

    The rows are real tensors on the host: a batch that would take more than
    `SYNTHETIC_BATCH_LIMIT` is refused (`InvalidSetting` naming the batch
    size, or the length when one row is too long) before anything is allocated.
    """
    size = synthetic_batch_bytes(batch_size, max_length, prompt_length, num_safety, reference_kl, kd_top_k)
    if size > SYNTHETIC_BATCH_LIMIT:
        one_row = synthetic_batch_bytes(1, max_length, prompt_length, num_safety, reference_kl, kd_top_k)
        field_name = "max_length" if one_row > SYNTHETIC_BATCH_LIMIT else "per_device_train_batch_size"
        raise InvalidSetting(field_name, f"{batch_size} rows of {max_length} tokens with {num_safety} safety tokens are too "
                                         f"large to plan: the plan builds one such micro-batch in host memory, "
                                         f"{size / 2**30:.1f} GiB, over its {SYNTHETIC_BATCH_LIMIT >> 30} GiB; plan fewer or "
                                         "shorter rows (a step's memory grows in proportion to both)")
    generator = torch.Generator().manual_seed(0)
    steps = max_length - prompt_length
    safety = torch.arange(num_safety)
    rows = [{
        "example_id": index,
        "input_ids": torch.randint(0, vocab_size, (max_length,), generator=generator),
        "response_start": prompt_length,
        "response_spans": torch.tensor([[prompt_length, max_length]]),
        "safety_ids": safety,
        "columns": safety,
        "full_logits": torch.randn(steps, num_safety, generator=generator),
        "post_logits": torch.randn(steps, num_safety, generator=generator),
        "post_count": torch.randint(1, num_safety + 1, (steps,), generator=generator),
        "target_logprob": -torch.rand(steps, generator=generator),
        "logsumexp": torch.zeros(steps),
    } for index in range(batch_size)]
    if reference_kl:
        for row in rows:
            row["reference_logits"] = torch.randn(steps, num_safety, generator=generator)
            row["rest_logprob"] = -torch.rand(steps, generator=generator)
    for row in rows if kd_top_k else ():
        start = torch.randint(0, vocab_size - kd_top_k + 1, (steps, 1), generator=generator)
        row["kd_ids"] = start + torch.arange(kd_top_k)  # distinct ids at each step
        row["kd_logprobs"] = -torch.rand(steps, kd_top_k, generator=generator).sort(dim=1).values * 10 - 1
        row["kd_tail"] = -torch.rand(steps, generator=generator) - 1
    return rows


class DecoderScope:
    """Whether execution is inside the decoder stacks of some models: their forward, or their backward (from the moment
    the gradient of a decoder's output is computed until `end_backward`). Everything else a step makes is the loss's."""

    def __init__(self, models):

        self.depth = 0
        self.in_backward = False
        self._handles = []
        for model in models:
            decoder = decoder_stack(model)
            self._handles.append(decoder.register_forward_pre_hook(self._enter))
            self._handles.append(decoder.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        """A decoder's forward starts."""
        self.depth += 1

    def _leave(self, module, args, output) -> None:
        """A decoder's forward ends; its backward starts when the first gradient of its outputs is computed."""
        from torch.autograd.graph import register_multi_grad_hook

        self.depth -= 1
        outputs = [t for t in tensors_in(output) if t.requires_grad]
        if outputs:
            register_multi_grad_hook(outputs, self._start_backward, mode="any")

    def _start_backward(self, grad) -> None:
        """The backward has reached a decoder's output."""
        self.in_backward = True

    def end_backward(self) -> None:
        """The backward pass is over."""
        self.in_backward = False

    def category(self) -> str:
        """`activations` inside a decoder, `logits_loss` outside (`pact.planning.memory.CATEGORIES`)."""
        return "activations" if self.depth or self.in_backward else "logits_loss"

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


def trainer_optimizer(model, learning_rate: float = 3e-5) -> torch.optim.Optimizer:
    """The optimizer `pact train` builds by default (the Trainer's `adamw_torch_fused`) over the trainable parameters."""
    from transformers import Trainer, TrainingArguments

    kind, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(learning_rate=learning_rate, report_to="none"))
    return kind([p for p in model.parameters() if p.requires_grad], **kwargs)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors, created by one step on zero gradients (as after any first step)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def measure_step(student, rows: list[dict], variant: str, reference=None, ce_chunk_size: int = 1024,
                 objective: ObjectiveArguments | None = None) -> Peak:
    """The peak of live tensor bytes on the student's device during one optimizer step of `variant` on `rows`, after
    one step has made the optimizer's state (steady state), by category (`pact.planning.memory.CATEGORIES`).

    `sft`: the cross-entropy of the response tokens alone (`student_outputs`
    without safety tokens); `cached_pact`: `cached_pact_loss` on the rows,
    as `PactTrainer` computes it, under `objective` (default: PACT's); `online_pact`: `reference` fills the
    batch's targets (`OnlineTargets`), then `pact_batch_loss`; `cached_kd`: `cached_pact_loss` under `--objective
    kd` on rows holding a teacher's top-K; `online_kd`: `reference`, as the teacher, fills their top-K
    (`OnlineTeacher`) first. The same code measures real tensors and, under `plan`, meta tensors.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    safety_ids = rows[0]["safety_ids"]
    weights = torch.full((len(safety_ids),), 1.0 / len(safety_ids))
    cfg = objective if objective is not None else ObjectiveArguments()
    if variant in KD_VARIANTS:
        cfg = dataclasses.replace(cfg, objective="kd")
    models = [student] + ([reference] if variant in REFERENCE_VARIANTS else [])
    device = head_device(student)
    student.train()
    optimizer = trainer_optimizer(student)
    state = _optimizer_state(optimizer)
    scope = DecoderScope(models)
    tracker = LiveTensorBytes(device.type, scope.category)
    params = [p for p in student.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.track([p.grad], "trainable_state")) for p in params]
    try:
        with tracker:
            for model in models:
                tracker.track([*model.parameters(), *model.buffers()], "weights")
            tracker.track(state, "trainable_state")
            tracker.reset_peak("forward")
            if variant == "sft":
                loss = student_outputs(student, collate_spans(*_token_side(rows)), None, ce_chunk_size=ce_chunk_size).ce
            elif variant in ("cached_pact", "cached_kd"):
                loss = cached_pact_loss(student, rows, safety_ids, weights, cfg, 0, ce_chunk_size).loss
            elif variant == "online_kd":
                tracker.phase = "reference forward"
                batch = OnlineTeacher(reference, rows[0]["kd_ids"].shape[1]).fill(collate_rows(rows, 0))
                tracker.phase = "forward"
                loss = pact_batch_loss(student, batch, safety_ids, weights, cfg, ce_chunk_size).loss
            else:
                tracker.phase = "reference forward"
                batch = OnlineTargets(reference, safety_ids, [0] * HEADER_TOKENS, cfg, 0).fill(collate_spans(*_token_side(rows)))
                tracker.phase = "forward"
                loss = pact_batch_loss(student, batch, safety_ids, weights, cfg, ce_chunk_size).loss
            tracker.phase = "backward"
            loss.backward()
            scope.end_backward()
            del loss
            tracker.phase = "optimizer step"
            with tracker.region("trainable_state"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        scope.close()
        for hook in hooks:
            hook.remove()
    return tracker.peak


def _token_side(rows: list[dict]) -> tuple:
    """`collate_spans`' arguments for cache rows (their tokens and response spans, no targets)."""
    return [r["input_ids"] for r in rows], [r["response_spans"] for r in rows], [r["example_id"] for r in rows], 0

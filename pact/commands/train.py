"""`pact train`: fine-tune from a reference cache with the PACT loss."""

from __future__ import annotations

import argparse

from pact.errors import InvalidSetting
from pact.objective import PactConfig


def add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every constant of the objective (docs/objective.md section 2), with the paper's defaults."""
    d = PactConfig()
    group = parser.add_argument_group("objective (docs/objective.md section 2)")
    group.add_argument("--lambda", dest="lam", type=float, default=d.lam, help=f"weight of the safety-token KL; 0 is plain SFT (default {d.lam})")
    group.add_argument("--temperature", type=float, default=d.temperature, help=f"KL temperature T (default {d.temperature})")
    group.add_argument("--p0", type=float, default=d.p0, help=f"top-p mass of the gate's count (default {d.p0}; baked into the cache)")
    group.add_argument("--alpha", type=float, default=d.alpha, help=f"gate slope (default {d.alpha})")
    group.add_argument("--gate-offset", dest="b", type=float, default=d.b, help=f"gate offset b (default {d.b})")
    group.add_argument("--gate-temperature", type=float, default=d.gate_temperature, help=f"gate temperature Tg (default {d.gate_temperature}; baked into the cache)")
    group.add_argument("--free-steps", dest="n_free", type=int, default=d.n_free, help=f"response steps N before the gate decays (default {d.n_free})")
    group.add_argument("--tau", type=float, default=d.tau, help=f"gate decay time constant (default {d.tau})")
    group.add_argument("--boost", type=float, default=d.boost, help=f"gate scale (default {d.boost})")


def objective_from_args(args: argparse.Namespace) -> PactConfig:
    """The `PactConfig` the objective flags describe."""
    return PactConfig(temperature=args.temperature, lam=args.lam, p0=args.p0, alpha=args.alpha, b=args.b,
                      gate_temperature=args.gate_temperature, n_free=args.n_free, tau=args.tau, boost=args.boost)


def register(subparsers) -> None:
    """Add `pact train`."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune from a reference cache (no reference model in memory)",
        description="Fine-tune the cache's reference model with CE + lambda * safety-token KL, reading targets from the cache.",
    )
    parser.add_argument("--cache", required=True, help="cache directory built by `pact-cache build`")
    parser.add_argument("--out", required=True, help="output directory: adapter (or full model), metrics.jsonl, curves.png, config.json")
    parser.add_argument("--model", help="student starting point (default: the cache's reference model)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default 32)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    parser.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names LoRA adapts (default q_proj,v_proj)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=3, help="passes over the cache (default 3)")
    length.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows per micro-batch and process (default 8); under torchrun with N processes an optimizer step "
                             "takes batch-size x grad-accum x N rows, the same global batch one process with batch-size x N takes")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (default 3e-5)")
    parser.add_argument("--scheduler", default="linear", help="learning-rate schedule: linear (default), cosine, constant or constant_with_warmup")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    parser.add_argument("--seed", type=int, default=42, help="seed for adapter init and data order (default 42)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (for GPUs)")
    parser.add_argument("--save-steps", type=int, default=0, help="write a resumable checkpoint every N optimizer steps (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--force", action="store_true", help="train even if the model or tokenizer fingerprint differs from the cache's")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto; under torchrun each process uses cuda:LOCAL_RANK)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_objective_arguments(parser)
    parser.set_defaults(func=run, flags=flags_by_field(parser))


def flags_by_field(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's destination (the `TrainConfig`/`PactConfig` field it fills) mapped to its long flag, e.g. lam -> --lambda."""
    return {action.dest: action.option_strings[-1] for action in parser._actions if action.option_strings}


def run(args: argparse.Namespace) -> int:
    """Run training and print where the outputs are."""
    from pact.train import train

    try:
        result = train(_config_from_args(args))
    except InvalidSetting as err:
        flag = args.flags.get(err.field)
        if flag is None:
            raise
        raise InvalidSetting(err.field, f"{flag}: {err}") from err
    last = result.metrics[-1] if result.metrics else {}
    print(f"trained {result.steps} steps; final loss {last.get('loss', float('nan')):.4f} "
          f"(ce {last.get('ce', float('nan')):.4f}, kl {last.get('kl', float('nan')):.4f}); outputs in {result.out}")
    return 0


def _config_from_args(args: argparse.Namespace):
    """The `TrainConfig` the flags describe (constructing it checks every value)."""
    from pact.train import TrainConfig

    return TrainConfig(
        cache=args.cache, out=args.out, model=args.model, full=args.full, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        scheduler=args.scheduler, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16, save_steps=args.save_steps, resume=args.resume, force=args.force, device=args.device,
        objective=objective_from_args(args), progress=not args.no_progress,
    )

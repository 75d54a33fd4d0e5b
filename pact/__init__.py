"""pact-cache: fine-tune aligned LLMs without losing their safety alignment.

The PACT objective keeps the model's confidence on a few safety tokens close
to the aligned reference; `pact.cache_tools` stores the reference's targets
once so training needs no reference model, and `pact.kernels` holds the
Triton masked-KL kernel. The public names below are imported on first use
(`import pact` stays cheap); docs/architecture.md shows the layers.
"""

import importlib
import importlib.metadata
import sys
from pathlib import Path

__version__ = importlib.metadata.version("pact-cache")

_PUBLIC = {
    # training
    "PactTrainer": "pact.training.trainer",
    "PactTrainingArguments": "pact.training.arguments",
    "train": "pact.training.train",
    "TrainResult": "pact.training.train",
    # the objective
    "ObjectiveArguments": "pact.objective.settings",
    "OBJECTIVES": "pact.objective.settings",
    "pact_batch_loss": "pact.objective.loss",
    "cached_pact_loss": "pact.objective.loss",
    "PactOutput": "pact.objective.loss",
    "TargetSource": "pact.objective.targets",
    "CachedTargets": "pact.objective.targets",
    "OnlineTargets": "pact.objective.targets",
    "OnlineTeacher": "pact.objective.distillation",
    "teacher_topk": "pact.objective.distillation",
    "SafetyTokens": "pact.objective.safety_tokens",
    "compute_safety_tokens": "pact.objective.safety_tokens",
    # the cache
    "CacheReader": "pact.cache_tools",
    "build_cache": "pact.cache_tools",
    "export_axolotl": "pact.cache_tools.kd_export",
    # data and models
    "load_examples": "pact.data.chat",
    "load_conversations": "pact.data.rows",
    "load_prompts": "pact.data.rows",
    "collate_rows": "pact.data.batch",
    "CacheBatch": "pact.data.batch",
    "load_model": "pact.models.loading",
    "load_tokenizer": "pact.models.loading",
    "pad_token_id": "pact.models.loading",
    "AdapterArguments": "pact.models.adapters",
    "load_student": "pact.models.adapters",
    "export_merged": "pact.models.export",
    # planning and evaluation
    "plan": "pact.planning.plan",
    "PlanArguments": "pact.planning.arguments",
    "evaluate_refusals": "pact.evaluation.judge",
    "evaluate_task": "pact.evaluation.task",
    "safety_drift": "pact.evaluation.drift",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """A public name, imported from its module on first use."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pact' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


def _unshadow_hub_kernels() -> None:
    """Keep this checkout's `kernels/` folder from hiding the Hugging Face `kernels` package, which transformers (5.25 and
    later) imports: the folder is installed as `pact.kernels`, but `python -m ...` (pytest, torchrun, accelerate) started
    in the checkout's root puts that root on `sys.path`, where a top-level `import kernels` would find the folder."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "kernels" / "masked_kl.py").is_file():
        return
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    shadow = sys.modules.get("kernels")
    if shadow is not None and Path(getattr(shadow, "__file__", None) or "/").resolve().parent == root / "kernels":
        del sys.modules["kernels"]


_unshadow_hub_kernels()

"""Whether a cache serves a student: the same reference model and tokenizer (by fingerprint), the gate and top-k
temperature baked into the cache, and the columns the chosen objective reads.

A fingerprint means "the same reference": the model's compares the weights the model was loaded from, whatever
adapters are on it or however it is quantised; the tokenizer's leaves out the pad token (see `pact.models.loading`).
"""

from __future__ import annotations

import hashlib
import math

from pact.cache_tools import CacheReader
from pact.cache_tools.layout import FORMAT_VERSION
from pact.errors import PactError
from pact.models.loading import model_fingerprint, tokenizer_fingerprint, tokenizer_matches, weights_fingerprint
from pact.models.parts import unwrapped
from pact.models.quantization import is_quantized
from pact.objective.settings import ObjectiveArguments

OVERRIDE = "pass force=True to train anyway (to PactTrainer or PactTrainingArguments; --force on the command line)"


class StudentIdentity:
    """The student's model and tokenizer as a cache's fingerprints are compared with them.

    `fingerprint` is the model's (`model_fingerprint`) when already known (`LoadedModel.fingerprint`). A cache that
    recorded another kind of model fingerprint (the weights themselves: built from a model held in memory, or from a hub
    id by an earlier pact) is compared with `weights_fingerprint`, computed once, on demand.
    """

    def __init__(self, model, tokenizer, fingerprint: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint or model_fingerprint(model)
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self._weights: str | None = None

    def model_matches(self, recorded: str) -> bool:
        """Whether the cache's model fingerprint `recorded` is this model's base weights."""
        if recorded == self.fingerprint:
            return True
        if is_quantized(self.model):
            return False  # its tensors are quantised: only its weight files can match
        if self._weights is None:
            self._weights = weights_fingerprint(self.model)
        return recorded == self._weights

    def differences(self, manifest: dict) -> list[str]:
        """What differs from the reference `manifest` records, each said plainly; empty when it is the same reference."""
        expected = manifest.get("fingerprints", {})
        problems = []
        if expected.get("model") is not None and not self.model_matches(expected["model"]):
            name = getattr(unwrapped(self.model).config, "_name_or_path", "") or "a model built in memory"
            problems.append(f"model fingerprint differs from the cache's: the weights of {name!r} are not those of "
                            f"{manifest.get('model_source')!r}, which the cache was built from "
                            f"({self.fingerprint[:19]}... vs {expected['model'][:19]}...)")
        if expected.get("tokenizer") is not None and not tokenizer_matches(self.tokenizer, expected["tokenizer"]):
            template = hashlib.sha256((self.tokenizer.chat_template or "").encode()).hexdigest()
            recorded = (manifest.get("data") or {}).get("chat_template_sha256")
            what = "its chat template" if recorded and recorded != template else "its vocabulary or special tokens"
            problems.append(f"tokenizer fingerprint differs from the cache's: {what} differ from those of "
                            f"{manifest.get('model_source')!r}'s tokenizer, so the cache's token ids may mean other tokens")
        return problems


def check_compatibility(manifest: dict, student: StudentIdentity, cfg: ObjectiveArguments, force: bool) -> list[str]:
    """Refuse a model, tokenizer or objective setting the cache was not built for.

    Returns warnings (fingerprint differences overridden by `force`); raises `PactError` otherwise. The gate's p0 and
    Tg and the top-k temperature are baked into the cache and never overridable.
    """
    gate = manifest.get("gate") or {}
    for key, value in (("p0", cfg.p0), ("gate_temperature", cfg.gate_temperature)):
        if key in gate and not math.isclose(float(gate[key]), float(value)):
            raise PactError(f"the cache was built with gate {key}={gate[key]} but training asks for {value}; rebuild the cache")
    if manifest.get("objective_temperature") is not None and manifest.get("top_k") and not math.isclose(float(manifest["objective_temperature"]), cfg.temperature):
        raise PactError(f"the cache's top-k columns were chosen for T={manifest['objective_temperature']}, training asks for T={cfg.temperature}")
    problems = student.differences(manifest)
    if problems and not force:
        raise PactError("; ".join(problems) + f"; {OVERRIDE}")
    return problems


def check_cache_serves(reader: CacheReader, cfg: ObjectiveArguments) -> None:
    """Refuse a cache that lacks what the objective needs: the reference KL (refkl, refkl+tokenwise) reads the
    reference's logits on all of S and its probability outside S, which caches of format 3 and later built without --top-k hold;
    older caches still train the other objectives. Distillation (kd, pact+kd) reads a teacher's top-K, which a cache built
    with --kd_top_k holds; a distillation-only cache (--safety_targets false) holds nothing else, so it trains kd alone."""
    layout = reader.layout
    if not layout.stores_safety and cfg.objective != "kd":
        raise PactError(f"the cache {reader.directory} cannot train --objective {cfg.objective}: it is a distillation-only "
                        "cache (built with --safety_targets false), which holds a teacher's top-K and no safety targets; "
                        "train --objective kd from it, or build a cache with safety targets (`pact-cache build` without "
                        "--safety_targets false, adding --kd_top_k for pact+kd)")
    if cfg.uses_reference_kl and not layout.stores_reference:
        why = (f"it was built with --top-k {layout.top_k}" if layout.top_k else
               f"it is a format version {layout.format_version} cache, older than this pact's {FORMAT_VERSION}")
        raise PactError(f"the cache {reader.directory} cannot train --objective {cfg.objective}: {why}, so it holds no "
                        "reference logits on every safety token nor the reference's probability outside them; rebuild it "
                        f"with `pact-cache build --out {reader.directory} --overwrite` (with the same --model, --data and "
                        "--safety-tokens, without --top-k), or train an objective it holds (pact, tokenwise, pact+tokenwise)")
    if cfg.uses_kd and layout.kd_top_k is None:
        raise PactError(f"the cache {reader.directory} cannot train --objective {cfg.objective}: it holds no teacher top-K "
                        "(it was built without --kd_top_k); rebuild it with `pact-cache build --out "
                        f"{reader.directory} --overwrite --kd_top_k 50` (with the same --model, --data and --safety-tokens, "
                        "and --teacher for a teacher other than the model)")

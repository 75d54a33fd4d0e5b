"""Check `pact.objective.safety_tokens` against the independent implementation on real data.

Runs both on the embedded model (SmolLM2-135M-Instruct, base = itself) with
the first rows of a refusal data set and prints whether the safety-token ids
agree, the largest weight difference (must be <= 2e-3) and both timings.

    python benchmarks/check_safety_tokens.py --data ../shared/data/refusals.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from independent_safety_tokens import independent_safety_tokens  # noqa: E402

from pact.data.rows import load_conversations
from pact.models.loading import load_model
from pact.objective.safety_tokens import compute_safety_tokens

TOLERANCE = 2e-3


def main(argv: list[str] | None = None) -> int:
    """Run both implementations and report agreement; exit 1 when they disagree."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="refusal data (e.g. ../shared/data/refusals.jsonl)")
    parser.add_argument("--rows", type=int, default=128, help="use the first N rows (also --max-examples)")
    parser.add_argument("--top", type=int, default=50, help="safety tokens kept")
    parser.add_argument("--max-resp-len", type=int, default=64, help="response tokens scored per example")
    parser.add_argument("--diff-mode", default="p_diff", choices=("p_diff", "pref_logratio"))
    parser.add_argument("--device", default="cpu", help="device for both runs")
    args = parser.parse_args(argv)

    conversations, report = load_conversations(args.data, skip_invalid=True, limit=args.rows)
    model = load_model(device=args.device, dtype="float32")
    params = dict(top=args.top, max_examples=args.rows, max_resp_len=args.max_resp_len, diff_mode=args.diff_mode)

    started = time.perf_counter()
    result = compute_safety_tokens(model, None, conversations, progress=False, **params)
    api_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ids, weights = independent_safety_tokens(model.model, model.tokenizer, model.model, model.tokenizer, conversations, **params)
    independent_seconds = time.perf_counter() - started

    same_ids = result.ids == ids
    max_diff = max(abs(a - b) for a, b in zip(result.weights, weights)) if same_ids else float("inf")
    print(f"data: {args.data}  rows used: {result.params['examples_used']} (invalid skipped: {report.skipped})")
    print(f"params: {params}")
    print(f"|S| = {len(result)} ({sum(w > 0 for w in result.weights)} positive)  ids equal: {same_ids}")
    print(f"max |weight difference|: {max_diff:.3e}  (tolerance {TOLERANCE:g})")
    print(f"time: pact.objective.safety_tokens {api_seconds:.1f}s, independent {independent_seconds:.1f}s")
    heaviest = sorted(zip(result.weights, result.tokens), reverse=True)[:10]
    print("heaviest: " + ", ".join(f"{token!r} {weight:.3f}" for weight, token in heaviest))
    ok = same_ids and max_diff <= TOLERANCE
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`inspect_cache`: what a cache holds, for people (`pact-cache inspect`).

The manifest summary, and optionally one row decoded: each response token
with the reference's log-prob of it and the safety tokens the reference
found most likely at that step (probabilities over the full vocabulary,
exp(logit - logsumexp), from the full-context logits), or in a
distillation-only cache the tokens the teacher found most likely.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pact.cache_tools.reader import CacheReader
from pact.errors import PactError
from pact.models.loading import load_tokenizer

TOP_SAFETY = 3


def _tokenizer(model_source: str):
    """The cache's tokenizer for decoding response tokens, or None when it cannot be loaded here."""
    try:
        return load_tokenizer(model_source)
    except (PactError, OSError, ValueError):
        return None


def inspect_row(reader: CacheReader, index: int, top: int = TOP_SAFETY) -> dict:
    """Row `index` decoded: every response step with its token, the reference's log-prob of it and the top safety tokens
    (in a distillation-only cache, the teacher's top tokens instead)."""
    row = reader[index]
    tokenizer = _tokenizer(reader.manifest["model_source"])
    decode = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else (lambda ids: " ".join(f"<{i}>" for i in ids))
    spans = row["response_spans"].tolist()
    response = [token for start, end in spans for token in row["input_ids"][start:end].tolist()]
    turns = [turn for turn, (start, end) in enumerate(spans) for _ in range(end - start)]
    most_likely = _top_safety(reader, row, top) if reader.layout.stores_safety else _top_teacher(row, top, decode)
    return {
        "row": index,
        "example_id": row["example_id"],
        "prompt_tokens": row["response_start"],
        "prompt": decode(row["input_ids"][:row["response_start"]].tolist()),
        "steps": [
            {
                "step": t,
                "turn": turns[t],
                "token_id": token,
                "token": decode([token]),
                "target_logprob": float(row["target_logprob"][t]),
                **(most_likely[t] if most_likely else {}),
            }
            for t, token in enumerate(response)
        ],
    }


def _top_safety(reader: CacheReader, row: dict, top: int) -> list[dict]:
    """Per step of a row with safety targets: the post-only count and the `top` safety tokens the reference found most
    likely, with their probabilities."""
    names = dict(zip(reader.manifest["safety_tokens"]["ids"], reader.manifest["safety_tokens"]["tokens"]))
    steps = len(row["post_count"])
    safety_ids = row["safety_ids"].expand(steps, -1) if row["safety_ids"].dim() == 1 else row["safety_ids"]
    best = torch.exp(row["full_logits"] - row["logsumexp"][:, None]).topk(min(top, row["full_logits"].shape[1]), dim=1)
    return [{"post_count": int(row["post_count"][t]),
             "top_safety": [{"token_id": int(safety_ids[t, j]), "token": names[int(safety_ids[t, j])], "prob": float(p)}
                            for p, j in zip(best.values[t].tolist(), best.indices[t].tolist())]}
            for t in range(steps)]


def _top_teacher(row: dict, top: int, decode) -> list[dict]:
    """Per step of a distillation-only row: the teacher's `top` most likely tokens with their probabilities."""
    return [{"top_teacher": [{"token_id": int(i), "token": decode([int(i)]), "prob": float(math.exp(p))}
                             for i, p in zip(ids[:top].tolist(), logprobs[:top].tolist())]}
            for ids, logprobs in zip(row["kd_ids"], row["kd_logprobs"])]


def inspect_cache(directory: str | Path, row: int | None = None, top: int = TOP_SAFETY) -> dict:
    """Manifest summary of a cache (incomplete builds included), plus row `row` decoded when given."""
    reader = CacheReader(directory, allow_incomplete=True)
    m = reader.manifest
    tokens = m["safety_tokens"] or {"ids": [], "weights": [], "tokens": []}
    ranked = sorted(zip(tokens["weights"], tokens["tokens"], tokens["ids"]), reverse=True)
    info = {
        "directory": str(reader.directory),
        "format_version": m["format_version"],
        "complete": m["complete"],
        "created_at": m["created_at"],
        "model_source": m["model_source"],
        "fingerprints": m["fingerprints"],
        "data": m.get("data"),
        "part": m.get("part"),
        "dtype": m["dtype"],
        "top_k": m["top_k"],
        "gate": m["gate"],
        "objective_temperature": m["objective_temperature"],
        "params": m["params"],
        "safety_tokens": len(tokens["ids"]),
        "stored_columns": reader.layout.width,
        "top_weighted_safety_tokens": [{"token": t, "id": i, "weight": w} for w, t, i in ranked[:10]],
        "totals": m["totals"],
        "kd_top_k": m.get("kd_top_k"),
        "kd_teacher": m.get("kd_teacher"),
    }
    if row is not None:
        info["row"] = inspect_row(reader, row, top)
    return info


def format_inspection(info: dict) -> str:
    """Human-readable form of `inspect_cache`."""
    t = info["totals"]
    data = info.get("data") or {}
    lines = [
        f"cache {info['directory']} (format {info['format_version']}, {'complete' if info['complete'] else 'INCOMPLETE'}, built {info['created_at']})",
        f"model: {info['model_source']} ({info['fingerprints']['model']})",
        f"data: {data.get('path') or data.get('dataset') or '-'} ({info['fingerprints'].get('data') or info['fingerprints']['examples']})"
        + (f", part {info['part']['index']} of {info['part']['count']} (--num-shards)" if info.get("part") else ""),
        f"rows {t['rows']}, response tokens {t['response_tokens']}, shards {t['shards']}, {t['bytes']} bytes"
        + (f" ({t['bytes_per_response_token']:.1f} per response token, {t['compression_ratio']:.1f}x smaller than raw float32)"
           if t["response_tokens"] else ""),
        *(_safety_lines(info) if info["safety_tokens"] else ["layout: no safety targets (a distillation-only cache)"]),
        *([f"distillation: the top-{info['kd_top_k']} log-probs and tail of {info['kd_teacher']['source']} "
           f"({info['kd_teacher']['fingerprint']}) per response token"] if info.get("kd_top_k") else []),
    ]
    row = info.get("row")
    if row:
        lines.append(f"row {row['row']} (example_id {row['example_id']}), prompt of {row['prompt_tokens']} tokens:")
        lines.append("  " + row["prompt"].replace("\n", "\n  "))
        safety = info["safety_tokens"] > 0
        lines.append("  step  token                 logp   " + ("count  top safety tokens (reference probability)" if safety
                                                                else "top tokens (teacher probability)"))
        for step in row["steps"]:
            top = ", ".join(f"{s['token']!r} {s['prob']:.3f}" for s in step["top_safety" if safety else "top_teacher"])
            count = f"{step['post_count']:5d}  " if safety else ""
            lines.append(f"  {step['step']:4d}  {step['token']!r:20.20s} {step['target_logprob']:7.3f}  {count}{top}")
    return "\n".join(lines)


def _safety_lines(info: dict) -> list[str]:
    """The lines of `format_inspection` on a cache's safety targets: its layout, the gate and the heaviest tokens."""
    return [
        f"layout: dtype {info['dtype']}, {info['stored_columns']} of {info['safety_tokens']} safety tokens stored"
        + (f" (top-{info['top_k']} per step, chosen at T={info['objective_temperature']})" if info["top_k"] else " (all with weight > 0: exact)"),
        f"gate baked in: p0={info['gate']['p0']}, Tg={info['gate']['gate_temperature']}",
        "highest-weighted safety tokens: " + ", ".join(f"{s['token']!r} {s['weight']:.3f}" for s in info["top_weighted_safety_tokens"]),
    ]

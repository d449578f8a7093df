#!/usr/bin/env python3
"""Checks shardnet's engine against llama.cpp on the same GGUF files (`make check-reference`).

For each model: token ids of a set of texts from both tokenizers, 64 greedy tokens from the same
prompt, and the logits after the prompt and after the last token, compared as
max|ours - llama.cpp| / max|llama.cpp|. Writes target/reference/report.json.

Models: the demo model in F32, F16 and Q8_0, a grouped-query shape (8 heads over 2 KV heads,
tied output), and SmolLM2 when models_cache has it.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDCTL = os.path.join(ROOT, "target/release/shardctl")
REFERENCE = os.path.join(ROOT, "target/reference/reference")
OUT = os.path.join(ROOT, "target/reference")
SMOLLM2 = os.path.join(ROOT, "models_cache/SmolLM2-135M-Instruct.Q4_1.gguf")

TEXTS = [
    "Hello world",
    "The capital of France is",
    "  leading spaces and trailing  ",
    "digits 1234567 and 3.14159, -42!",
    "punctuation: (a), [b]; {c}... \"quoted\" 'single' it's we'll they've",
    "naïve café, 日本語のテキスト, emoji 🙂🚀",
    "tabs\tand\nnew\n\nlines   and    runs",
    "MiXeD CaSe wOrDs and_underscores-and-dashes",
    "$100 + 50% = <tag> ^ ~ | `code`",
    "Ünïcödé Ελληνικά Русский العربية",
]
STEPS = 64


def run(cmd, stdin=None):
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])}...: {p.stderr.strip()}")
    return p.stdout


def rel(a, b):
    scale = max(abs(x) for x in b) or 1.0
    return max(abs(x - y) for x, y in zip(a, b)) / scale


def check(name, path):
    lines = "".join(json.dumps(t) + "\n" for t in TEXTS)
    ours = [json.loads(l) for l in run([SHARDCTL, "tokenize", path], lines).splitlines()]
    theirs = [json.loads(l) for l in run([REFERENCE, "tokenize", path], lines).splitlines()]
    tok_same = sum(a == b for a, b in zip(ours, theirs))
    mismatches = [(t, a, b) for t, a, b in zip(TEXTS, ours, theirs) if a != b]

    prompt = theirs[1] or [1]
    ref = json.loads(run([REFERENCE, "greedy", path, str(STEPS)] + [str(t) for t in prompt]))
    got = json.loads(run([SHARDCTL, "--json", "generate", path, "--prompt-ids", ",".join(map(str, prompt)),
                          "-n", str(STEPS), "--ignore-eos", "--logits", "--ctx", "512"]))
    same_prefix = 0
    for a, b in zip(got["tokens"], ref["tokens"]):
        if a != b:
            break
        same_prefix += 1
    r = {
        "model": name,
        "tokenizer_agree": f"{tok_same}/{len(TEXTS)}",
        "greedy_agree": f"{same_prefix}/{STEPS}",
        "prefill_logits_rel_diff": rel(got["prefill_logits"], ref["prefill_logits"]),
        "final_logits_rel_diff": rel(got["final_logits"], ref["final_logits"]) if same_prefix == STEPS else None,
        "tokenizer_mismatches": mismatches,
    }
    print(f"{name:<24} tokens {r['tokenizer_agree']:>6}  greedy {r['greedy_agree']:>6}  "
          f"prefill logits {r['prefill_logits_rel_diff']:.2e}  final logits "
          + (f"{r['final_logits_rel_diff']:.2e}" if r['final_logits_rel_diff'] is not None else "n/a"))
    for t, a, b in mismatches:
        print(f"    {t!r}: ours {a} llama.cpp {b}")
    return r


def main():
    for tool in (SHARDCTL, REFERENCE):
        if not os.path.exists(tool):
            sys.exit(f"{tool} missing: make check-reference builds it")
    models = []
    for name, flags in [
        ("demo-f32", ["--type", "f32"]),
        ("demo-f16", ["--type", "f16"]),
        ("demo-q8_0", ["--type", "q8_0"]),
        ("demo-q4_0", ["--type", "q4_0"]),
        ("demo-gqa-f32-tied", ["--type", "f32", "--embd", "256", "--heads", "8", "--kv-heads", "2", "--layers", "4", "--tied"]),
    ]:
        path = os.path.join(OUT, name + ".gguf")
        run([SHARDCTL, "demo-model", "--out", path] + flags)
        models.append((name, path))
    if os.path.exists(SMOLLM2):
        models.append(("smollm2-q4_1", SMOLLM2))
    else:
        print(f"note: {SMOLLM2} missing (make models); checking demo models only")
    report = [check(n, p) for n, p in models]
    with open(os.path.join(OUT, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    bad = [r["model"] for r in report
           if r["tokenizer_agree"].split("/")[0] != r["tokenizer_agree"].split("/")[1]
           or r["greedy_agree"] != f"{STEPS}/{STEPS}"
           or (r["model"].endswith(("f32", "f32-tied")) and (r["final_logits_rel_diff"] or 1) > 1e-3)]
    if bad:
        sys.exit(f"disagreement with llama.cpp: {', '.join(bad)}")
    print("agrees with llama.cpp")


if __name__ == "__main__":
    main()

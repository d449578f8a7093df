#!/usr/bin/env python3
"""Renders chat templates with Python's jinja2 the way Hugging Face's `apply_chat_template` does
(transformers' `_compile_jinja_template`: an ImmutableSandboxedEnvironment with trim_blocks,
lstrip_blocks and loop controls, plus `raise_exception` and a `tojson` filter), for the Rust
tests to compare with shardnet's minijinja rendering (src/chat.rs).

Reads a JSON list of cases on stdin, each {template, messages, add_generation_prompt, bos_token,
eos_token}; prints a JSON list with, per case, {"text": ...} or {"error": ...}."""
import json
import sys

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def main():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    out = []
    for case in json.load(sys.stdin):
        try:
            template = env.from_string(case["template"])
            text = template.render(
                messages=case["messages"],
                add_generation_prompt=case["add_generation_prompt"],
                bos_token=case["bos_token"],
                eos_token=case["eos_token"],
            )
            out.append({"text": text})
        except TemplateError as e:
            out.append({"error": str(e)})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

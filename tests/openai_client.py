#!/usr/bin/env python3
"""Drives `shardctl serve` with the official `openai` package (tests/serve.rs runs it).

usage: openai_client.py BASE_URL PROMPT
Prints one JSON object with what each call returned; the Rust test compares it with the whole
model run in one process.
"""
import json
import sys

import openai

base, prompt = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", timeout=120, max_retries=0)
out = {}

models = client.models.list()
out["models"] = [m.id for m in models.data]
model = out["model"] = out["models"][0]


def completion(**kw):
    r = client.completions.create(model=model, prompt=prompt, temperature=0, **kw)
    c = r.choices[0]
    assert r.object == "text_completion" and c.index == 0, r
    return {"text": c.text, "finish_reason": c.finish_reason, "usage": r.usage.model_dump()}


def completion_stream(**kw):
    text, chunks, finish, usage = "", [], None, None
    for ch in client.completions.create(model=model, prompt=prompt, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage.model_dump()
        for c in ch.choices:
            text += c.text
            if c.text:
                chunks.append(c.text)
            finish = c.finish_reason or finish
    return {"text": text, "chunks": len(chunks), "pieces": chunks, "finish_reason": finish, "usage": usage}


out["completion"] = completion(max_tokens=24)
out["completion_stream"] = completion_stream(max_tokens=24)
r = completion(max_tokens=3)
out["max_tokens"] = {"finish_reason": r["finish_reason"], "completion_tokens": r["usage"]["completion_tokens"]}

# A stop string across a token boundary: the end of one streamed piece and the start of the next.
pieces = out["completion_stream"]["pieces"]
k = len(pieces) // 2
stop = pieces[k][-2:] + pieces[k + 1][:2]
out["stop"] = dict(completion(max_tokens=24, stop=[stop, "never appears"]), stop=stop)
out["stop_stream"] = completion_stream(max_tokens=24, stop=stop)

messages = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
assert r.object == "chat.completion" and r.choices[0].message.role == "assistant", r
out["chat"] = {"text": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
               "usage": r.usage.model_dump()}
text, usage, roles = "", None, []
for ch in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24, stream=True,
                                         stream_options={"include_usage": True}):
    assert ch.object == "chat.completion.chunk", ch
    if ch.usage is not None:
        usage = ch.usage.model_dump()
    for c in ch.choices:
        text += c.delta.content or ""
        if c.delta.role:
            roles.append(c.delta.role)
out["chat_stream"] = {"text": text, "usage": usage, "roles": roles}

# models.retrieve (GET /v1/models/{id}, the id percent-encoded) and an unknown id.
out["retrieve"] = client.models.retrieve(model).id
try:
    client.models.retrieve("no-such-model")
    out["retrieve_unknown"] = "answered"
except openai.NotFoundError as e:
    out["retrieve_unknown"] = e.body.get("code") if isinstance(e.body, dict) else str(e.body)

# What the server cannot do is refused naming the field, not answered as if it were not asked.
refused = {}
for field, kw in [("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
                  ("response_format", {"response_format": {"type": "json_object"}}),
                  # logit_bias is applied; a token id outside the vocabulary is refused.
                  ("logit_bias", {"logit_bias": {"99999999": -100}})]:
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2, **kw)
        refused[field] = "answered"
    except openai.BadRequestError as e:
        refused[field] = e.body.get("param") if isinstance(e.body, dict) else str(e.body)
try:
    client.completions.create(model=model, prompt=prompt, max_tokens=2, echo=True)
    refused["echo"] = "answered"
except openai.BadRequestError as e:
    refused["echo"] = e.body.get("param") if isinstance(e.body, dict) else str(e.body)
out["refused"] = refused
json.dump(out, sys.stdout)

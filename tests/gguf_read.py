#!/usr/bin/env python3
"""Reads GGUF files with the `gguf` package (llama.cpp's own reader) and prints,
per file, its metadata and a SHA-1 of every tensor's bytes as JSON, for the
Rust tests to compare with shardnet's reader."""
import hashlib
import json
import sys

import gguf


def value(field):
    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def describe(path):
    r = gguf.GGUFReader(path)
    meta = {k: value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "dims": [int(d) for d in t.shape],
            "sha1": hashlib.sha1(t.data.tobytes()).hexdigest(),
            "bytes": int(t.n_bytes),
        }
        for t in r.tensors
    ]
    return {"path": path, "metadata": meta, "tensors": tensors}


if __name__ == "__main__":
    json.dump([describe(p) for p in sys.argv[1:]], sys.stdout)

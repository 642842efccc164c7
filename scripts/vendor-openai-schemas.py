#!/usr/bin/env python3
"""Extracts from OpenAI's published API description (openai/openai-openapi, openapi.json) the
component schemas of the objects ollama-batch returns, with everything they reference,
unchanged, into tests/data/openai-schemas.json (read by the conformance test).

    python3 scripts/vendor-openai-schemas.py path/to/openapi.json [COMMIT]
"""
import json
import sys

ROOTS = ["OpenAIFile", "Batch", "ListFilesResponse", "ListBatchesResponse",
         "DeleteFileResponse", "ErrorResponse", "CreateChatCompletionResponse",
         "CreateCompletionResponse", "CreateEmbeddingResponse", "Response"]


def refs(x, acc):
    if isinstance(x, dict):
        for k, v in x.items():
            if k == "$ref":
                acc.add(v.split("/")[-1])
            else:
                refs(v, acc)
    elif isinstance(x, list):
        for v in x:
            refs(v, acc)


def main():
    spec = json.load(open(sys.argv[1]))
    commit = sys.argv[2] if len(sys.argv) > 2 else "unknown"
    schemas = spec["components"]["schemas"]
    seen, todo = set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        acc = set()
        refs(schemas[name], acc)
        todo += list(acc)
    out = {
        "$comment": f"Component schemas from openai/openai-openapi openapi.json (OpenAPI {spec['openapi']}), commit {commit}, MIT License, Copyright (c) OpenAI. Extracted by scripts/vendor-openai-schemas.py: the schemas of the objects ollama-batch returns and everything they reference, unchanged.",
        "components": {"schemas": {n: schemas[n] for n in sorted(seen)}},
    }
    with open("tests/data/openai-schemas.json", "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()

"""The official openai SDK, unmodified but for base_url, against a running ollama-batch.

Usage: sdk_e2e.py BASE_URL N
Uploads N chat lines, creates a batch, polls it to completed, downloads the output and checks
every custom_id exactly once with its own answer; pages batches.list; cancels a batch; checks
that cancelling a finished batch is a 409.
"""
import json
import sys
import time

import openai
from openai import OpenAI

base, n = sys.argv[1], int(sys.argv[2])
client = OpenAI(base_url=base + "/v1", api_key="unused-locally")


def wait(batch_id, terminal=("completed", "failed", "cancelled", "expired")):
    deadline = time.time() + 60
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in terminal:
            return b
        assert time.time() < deadline, f"batch stuck: {b}"
        time.sleep(0.05)


lines = [
    json.dumps({
        "custom_id": f"c-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Score the candidate. " * 40},
                {"role": "user", "content": f"score c-{i}"},
            ],
            "max_tokens": 8,
        },
    })
    for i in range(1, n + 1)
]
f = client.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
assert f.purpose == "batch" and f.bytes > 0, f

b = client.batches.create(
    input_file_id=f.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"run": "sdk"},
)
assert b.metadata == {"run": "sdk"}, b
b = wait(b.id)
assert b.status == "completed", b
assert b.request_counts.total == n and b.request_counts.completed == n, b
assert b.request_counts.failed == 0 and b.error_file_id is None, b

ids = []
for line in client.files.content(b.output_file_id).text.splitlines():
    o = json.loads(line)
    cid = o["custom_id"]
    ids.append(cid)
    content = o["response"]["body"]["choices"][0]["message"]["content"]
    assert content == f"echo:score {cid}", (cid, content)
assert len(ids) == n and set(ids) == {f"c-{i}" for i in range(1, n + 1)}, ids

# Paging: three batches, one a page; the SDK pages until it has them all.
extra = [
    client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for _ in range(2)
]
listed = [x.id for x in client.batches.list(limit=1)]
assert listed == [extra[1].id, extra[0].id, b.id], listed

# Cancel: a fresh batch is cancelled (or had finished first: then 409 is right).
c = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
try:
    c = client.batches.cancel(c.id)
    assert c.status in ("cancelling", "cancelled"), c
    c = wait(c.id)
    assert c.status == "cancelled", c
except openai.ConflictError:
    assert wait(c.id).status == "completed"

# Cancelling a completed batch is a 409.
try:
    client.batches.cancel(b.id)
    raise AssertionError("cancel of a completed batch succeeded")
except openai.ConflictError:
    pass

# Unknown ids are a 404 NotFoundError.
try:
    client.batches.retrieve("batch_" + "0" * 32)
    raise AssertionError("unknown batch found")
except openai.NotFoundError:
    pass

# A /v1/responses batch: Responses lines (instructions, input messages with input_text parts,
# max_output_tokens, metadata), output bodies parsed as the SDK's own Response type.
from openai.types.responses import Response

rlines = [
    json.dumps({
        "custom_id": f"r-{i}",
        "method": "POST",
        "url": "/v1/responses",
        "body": {
            "model": "gpt-4o-mini",
            "instructions": "Score the candidate.",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": f"score r-{i}"}]}],
            "max_output_tokens": 16,
            "metadata": {"row": str(i)},
        },
    })
    for i in range(1, 11)
]
rf = client.files.create(file=("responses.jsonl", ("\n".join(rlines) + "\n").encode()), purpose="batch")
rb = client.batches.create(input_file_id=rf.id, endpoint="/v1/responses", completion_window="24h")
assert rb.endpoint == "/v1/responses", rb
rb = wait(rb.id)
assert rb.status == "completed" and rb.request_counts.completed == 10, rb
seen = []
for line in client.files.content(rb.output_file_id).text.splitlines():
    o = json.loads(line)
    r = Response.model_validate(o["response"]["body"])
    cid = o["custom_id"]
    assert r.output_text == f"echo:score {cid}", (cid, r.output_text)
    assert r.status == "completed" and r.object == "response", r
    assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens > 0, r.usage
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage
    assert r.metadata == {"row": cid[2:]}, r.metadata
    seen.append(cid)
assert sorted(seen) == sorted(f"r-{i}" for i in range(1, 11)), seen

print(f"SDK OK: openai {openai.__version__}, {n} lines, {len(listed)} batches paged, 10 Responses")

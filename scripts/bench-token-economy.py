#!/usr/bin/env python3
"""Prompt-cache economy on a real llama-server: the same shuffled batch under each scheduling
policy, and a bare client, on a fresh server per run (so no cache carries over).

    scripts/bench-token-economy.py [--repeats 2] [--lines 120] [--groups 1,8] [--cache-ram 0]
    scripts/bench-token-economy.py --independence GEMMA.gguf [--lines 40]

Needs the llama-server of scripts/llama-server.sh (.venv-llama) and a release build
(`cargo build --release`). For each number of groups (distinct ~1,300-token rubrics, lines
shuffled) and each policy, it reports the cached share (cached / prompt tokens, as llama.cpp
reports them), tokens prefilled (prompt - cached), the server's CPU seconds and the wall time:
medians over the repeats, which alternate the order of the policies (this 2-core machine is
noisy). Policies:
  input order  ollama-batch --scheduling fifo, the file as it is
  grouped      ollama-batch --scheduling fifo, the file sorted by rubric
  slot-affine  ollama-batch default (--scheduling affine, id_slot from /props)
  conversation ollama-batch --mode conversation --num-ctx 2048 (each slot a growing chat)
  bare client  4 threads posting the file in order straight to llama-server

--independence MODEL: what conversation mode costs in answer independence, with a real model
(the small Gemma 3 of shared/models, served with --swa-full and scripts/gemma3-base-template.jinja,
2 slots): one rubric, temperature 0, the batch run alone twice (the noise floor: llama.cpp's
answers at temperature 0 may still move with batching and caching) and once in conversation
mode; it reports how many lines' answers (and first numbers in them, the scores) differ.
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, ".venv-llama", "bin", "llama-cpp-server")
MODEL = os.path.join(ROOT, "..", "shared", "models", "tiny-llama-random.gguf")
BINARY = os.path.join(ROOT, "target", "release", "ollama-batch")


def rubric(g):
    words = ["experience", "impact", "ownership", "systems", "design", "clarity", "mentoring",
             "delivery", "reliability", "testing", "security", "data", "scale", "teamwork"]
    rng = random.Random(g)
    s = f"Rubric {g}. Score the candidate from 0 to 10 on these criteria. "
    while len(s) < 5200:
        s += f"{rng.choice(words)} {rng.choice(words)} matters; "
    return s


def make_lines(groups, n, seed):
    lines = []
    for i in range(n):
        g = i % groups
        lines.append((g, f"Candidate {i}: {random.Random(i).randint(1, 30)} years, profile {i * 7919 % 1000}."))
    random.Random(seed).shuffle(lines)
    return lines


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for n, (g, user) in enumerate(lines):
            f.write(json.dumps({"custom_id": f"l{n}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "tiny", "max_tokens": 8, "temperature": 0,
                                         "messages": [{"role": "system", "content": rubric(g)},
                                                      {"role": "user", "content": user}]}}) + "\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """utime + stime of a process and its children (llama-cpp-server execs llama-server)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def start_server(cache_ram, model=MODEL, slots=4, extra_args=()):
    port = free_port()
    extra = ["--cache-ram", cache_ram] if cache_ram != "default" else []
    proc = subprocess.Popen([SERVER, "-m", model, "--host", "127.0.0.1", "--port", str(port),
                             "--ctx-size", str(2048 * slots), "--", "-np", str(slots), "-n", "8",
                             "--alias", "tiny", "-t", "2"] + extra + list(extra_args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if json.load(urllib.request.urlopen(url + "/health", timeout=1)).get("status") == "ok":
                return proc, url
        except Exception:
            time.sleep(0.1)
    stop_server(proc)
    sys.exit("llama-server did not start")


def stop_server(proc):
    """Kills the wrapper and the llama-server it started (one process group)."""
    try:
        os.killpg(proc.pid, 9)
    except OSError:
        pass
    proc.wait()


def usage_sums(records):
    prompt = cached = 0
    for u in records:
        prompt += u.get("prompt_tokens", 0)
        cached += (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return prompt, cached


def run_ollama_batch(url, path, scheduling, work, extra=(), concurrency=4, bodies=False):
    out = os.path.join(work, f"out-{time.time_ns()}")
    state = os.path.join(work, f"state-{time.time_ns()}")
    cmd = [BINARY, "run", path, "--backend", "openai", "--backend-url", url, "--model", "tiny",
           "--concurrency", str(concurrency), "--scheduling", scheduling, "--listen", "127.0.0.1:0",
           "--state", state, "--out", out, "--print-every", "1h", "--poll", "100ms"] + list(extra)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"ollama-batch run failed ({r.returncode}): {r.stderr}")
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(os.path.join(out, stem + ".output.jsonl")) as f:
        lines = [json.loads(l) for l in f]
    if bodies:
        return {l["custom_id"]: l["response"]["body"] for l in lines}
    return [l["response"]["body"].get("usage", {}) for l in lines]


CONVERSATION = ["--mode", "conversation", "--num-ctx", "2048"]


def run_bare(url, path):
    bodies = [json.loads(l)["body"] for l in open(path)]
    results = [None] * len(bodies)
    nxt = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(bodies):
                return
            req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(bodies[i]).encode(),
                                         {"Content-Type": "application/json"})
            results[i] = json.load(urllib.request.urlopen(req, timeout=600)).get("usage", {})

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lines", type=int, default=120)
    ap.add_argument("--groups", default="1,8")
    ap.add_argument("--cache-ram", default="0", help="llama-server --cache-ram (MiB), or 'default'")
    ap.add_argument("--independence", metavar="GGUF", help="measure answer independence with this model")
    a = ap.parse_args()
    for p in (SERVER, BINARY):
        if not os.path.exists(p):
            sys.exit(f"missing {p} (scripts/llama-server.sh builds the server; cargo build --release)")
    if a.independence:
        return independence(a.independence, a.lines if a.lines != 120 else 40)
    policies = ["input order", "grouped", "slot-affine", "conversation", "bare client"]
    work = tempfile.mkdtemp(prefix="token-economy-")
    print(f"llama-server -np 4 -c 8192 (2,048 tokens a slot), --cache-ram {a.cache_ram}; "
          f"{a.lines} lines, max_tokens 8; medians of {a.repeats} alternated repeats\n")
    print("| groups | policy | cached share | tokens prefilled | server CPU s | wall s |")
    print("|---|---|---|---|---|---|")
    for groups in [int(g) for g in a.groups.split(",")]:
        lines = make_lines(groups, a.lines, seed=groups)
        shuffled = os.path.join(work, f"g{groups}.jsonl")
        write_jsonl(shuffled, lines)
        ordered = os.path.join(work, f"g{groups}-sorted.jsonl")
        write_jsonl(ordered, sorted(lines, key=lambda x: x[0]))
        cells = {p: [] for p in policies}
        for r in range(a.repeats):
            order = policies if r % 2 == 0 else list(reversed(policies))
            for policy in order:
                proc, url = start_server(a.cache_ram)
                try:
                    cpu0, t0 = cpu_seconds(proc.pid), time.time()
                    if policy == "input order":
                        usages = run_ollama_batch(url, shuffled, "fifo", work)
                    elif policy == "grouped":
                        usages = run_ollama_batch(url, ordered, "fifo", work)
                    elif policy == "slot-affine":
                        usages = run_ollama_batch(url, shuffled, "affine", work)
                    elif policy == "conversation":
                        usages = run_ollama_batch(url, shuffled, "affine", work, CONVERSATION)
                    else:
                        usages = run_bare(url, shuffled)
                    wall, cpu = time.time() - t0, cpu_seconds(proc.pid) - cpu0
                finally:
                    stop_server(proc)
                prompt, cached = usage_sums(usages)
                cells[policy].append((cached / prompt if prompt else 0.0, prompt - cached, cpu, wall))
        for policy in policies:
            c = cells[policy]
            med = lambda i: statistics.median(x[i] for x in c)
            print(f"| {groups} | {policy} | {100 * med(0):.1f} % | {med(1):,.0f} | {med(2):.1f} | {med(3):.1f} |")
        sys.stdout.flush()


# A base model does not follow instructions: the rubric is a list of scored examples, and each
# line's profile ends in "Score:" for the model to continue (scripts/gemma3-base-template.jinja
# lays the messages out as plain text).
SCORING = ("Scores of candidates for a senior backend role (1-10):\n"
           "Candidate A: 2 years of experience; skills: React, CSS, Figma; led 0 projects. Score: 2\n"
           "Candidate B: 12 years of experience; skills: Rust, PostgreSQL, Kafka; led 4 projects. Score: 8\n"
           "Candidate C: 6 years of experience; skills: Python, Kubernetes, Go; led 1 projects. Score: 5\n"
           "Candidate D: 20 years of experience; skills: C++, compilers, Go; led 6 projects. Score: 9\n"
           "Candidate E: 1 years of experience; skills: React, Python, CSS; led 0 projects. Score: 1\n"
           "Candidate F: 9 years of experience; skills: Go, Kafka, on-call; led 2 projects. Score: 6\n")


def profile(i):
    rng = random.Random(i)
    skills = ["Rust", "Go", "Python", "Kubernetes", "PostgreSQL", "Kafka", "React", "C++",
              "compilers", "ML pipelines", "on-call", "security reviews"]
    return (f"Candidate {i}: {rng.randint(1, 25)} years of experience; skills: "
            f"{', '.join(rng.sample(skills, 3))}; led {rng.randint(0, 6)} projects. Score:")


def first_number(text):
    digits = ""
    for ch in text:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return digits or None


def independence(model, n):
    work = tempfile.mkdtemp(prefix="independence-")
    path = os.path.join(work, "scoring.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "tiny", "max_tokens": 3, "temperature": 0,
                                         "messages": [{"role": "system", "content": SCORING},
                                                      {"role": "user", "content": profile(i)}]}}) + "\n")
    template = os.path.join(ROOT, "scripts", "gemma3-base-template.jinja")
    runs = {}
    for name, extra in [("alone", ()), ("alone again", ()), ("conversation", CONVERSATION)]:
        proc, url = start_server("0", model=model, slots=2,
                                 extra_args=["--swa-full", "--chat-template-file", template])
        try:
            t0 = time.time()
            bodies = run_ollama_batch(url, path, "affine", work, extra, concurrency=2, bodies=True)
            wall = time.time() - t0
        finally:
            stop_server(proc)
        answers = {k: (b["choices"][0]["message"].get("content") or "").strip() for k, b in bodies.items()}
        prompt, cached = usage_sums([b.get("usage", {}) for b in bodies.values()])
        runs[name] = (answers, prompt, cached, wall)
    print(f"{os.path.basename(model)}, llama-server -np 2 -c 4096 --swa-full, temperature 0, "
          f"{n} lines, one rubric, max_tokens 8\n")
    print("| run | answers differing from the first run alone | scores differing | scores given | prompt tokens | cached | wall s |")
    print("|---|---|---|---|---|---|---|")
    base = runs["alone"][0]
    for name, (answers, prompt, cached, wall) in runs.items():
        diff = sum(answers[k] != base[k] for k in base)
        sdiff = sum(first_number(answers[k]) != first_number(base[k]) for k in base)
        given = {}
        for k in base:
            score = first_number(answers[k]) or "none"
            given[score] = given.get(score, 0) + 1
        spread = ", ".join(f"{v}×{k}" for k, v in sorted(given.items(), key=lambda kv: (-kv[1], kv[0])))
        print(f"| {name} | {diff} of {n} ({100 * diff / n:.0f} %) | {sdiff} of {n} ({100 * sdiff / n:.0f} %) "
              f"| {spread} | {prompt:,} | {100 * cached / max(prompt, 1):.1f} % | {wall:.1f} |")
    print("\nexamples (alone → conversation):")
    conv = runs["conversation"][0]
    for k in list(base)[:6]:
        print(f"  {k}: {base[k]!r} → {conv[k]!r}")


if __name__ == "__main__":
    main()

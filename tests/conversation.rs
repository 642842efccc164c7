//! Conversation mode, against a fake llama.cpp that keeps every call's body, refuses calls past
//! its context and answers each call differently (so a line run again shows up in the next
//! line's history): in-process, and across real SIGKILLs of the server process.

use crate::support::fake::{Fake, Shape};
use crate::support::process::{self, Proc};
use crate::support::{Api, server_with};
use crate::support::{assert_exactly_once, ids};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A slot's context in the fake, in its tokens (4 characters of the request JSON a token).
const CONTEXT: u64 = 1400;

/// A system prompt of about 600 characters for group `g`.
fn rubric(g: usize) -> String {
    let mut s = format!("Rubric {g}. ");
    while s.len() < 600 {
        s.push_str(&format!("Criterion {g}-{}: judge carefully. ", s.len()));
    }
    s
}

/// One line's user turn: names its custom id; every 9th is refused by the fake.
fn user(n: usize) -> String {
    let refuse = if n % 9 == 4 { " REFUSE" } else { "" };
    format!(
        "score c-{n}{refuse} profile: {}",
        "worked on compilers and databases; ".repeat(5)
    )
}

/// `per_group` lines for each of `groups` rubrics, shuffled (seeded). Returns the file and, per
/// line number (1-based), its group.
fn input(groups: usize, per_group: usize, seed: u64) -> (Vec<u8>, Vec<usize>) {
    let mut gs: Vec<usize> = (0..groups)
        .flat_map(|g| std::iter::repeat_n(g, per_group))
        .collect();
    fastrand::Rng::with_seed(seed).shuffle(&mut gs);
    let mut file = String::new();
    for (i, g) in gs.iter().enumerate() {
        let n = i + 1;
        let v = json!({"custom_id": format!("c-{n}"), "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "max_tokens": 16, "messages": [
                {"role": "system", "content": rubric(*g)},
                {"role": "user", "content": user(n)}]}});
        file.push_str(&format!("{v}\n"));
    }
    (file.into_bytes(), gs)
}

fn line_of(user_content: &str) -> usize {
    user_content
        .strip_prefix("score c-")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a line's turn: {user_content}"))
}

/// What the checks found.
#[derive(Debug, Default)]
struct Seen {
    /// Lines called more than once (resumed after a kill, or retried).
    called_again: usize,
    /// Calls whose history was shorter than the turns their conversation had answered: cuts.
    cut_calls: usize,
    /// The longest history sent, in turns.
    longest_history: usize,
}

/// Checks every call the fake received against the finished batch's files:
/// - each line is in the output or the error file exactly once; refused lines are errors;
/// - every call is the group's system prompt, then (user, assistant) pairs, then the line's
///   own turn: never two user turns in a row, never a failed line's turn;
/// - each history turn is an earlier line of the same conversation (line i of a group is in
///   conversation i mod `lanes`), and its assistant turn is exactly that line's recorded answer;
/// - the last history turn is the conversation's previous success (nothing skipped);
/// - every call of a line carried exactly the same messages;
/// - the output's usage is the real prompt of the line's call.
async fn check(
    api: &Api,
    done: &Value,
    groups_of: &[usize],
    lanes: usize,
    bodies: &[Value],
) -> Seen {
    let n = groups_of.len();
    let mut answers: HashMap<usize, (String, u64)> = HashMap::new();
    let mut failed: HashMap<usize, String> = HashMap::new();
    let out = api.lines(&done["output_file_id"]).await;
    let errs = api.lines(&done["error_file_id"]).await;
    assert_exactly_once(out.iter().chain(errs.iter()), ids(n));
    for l in out {
        let id = l["custom_id"].as_str().expect("cid").to_string();
        let line: usize = id[2..].parse().expect("number");
        let body = &l["response"]["body"];
        let content = body["choices"][0]["message"]["content"]
            .as_str()
            .expect("answer")
            .to_string();
        assert!(
            content.starts_with(&format!("echo:score c-{line} ")),
            "{content}"
        );
        let prompt = body["usage"]["prompt_tokens"].as_u64().expect("usage");
        answers.insert(line, (content, prompt));
    }
    for l in errs {
        let id = l["custom_id"].as_str().expect("cid").to_string();
        failed.insert(id[2..].parse().expect("number"), l.to_string());
    }
    for i in 1..=n {
        assert_eq!(
            user(i).contains("REFUSE"),
            failed.contains_key(&i),
            "line {i}: refused lines and only they fail"
        );
    }
    // Each line's conversation, and the lines of each conversation in order.
    let mut conv_of = vec![(0usize, 0usize); n + 1];
    let mut counts = HashMap::new();
    let mut conv_lines: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
    for (i, g) in groups_of.iter().enumerate() {
        let k = counts.entry(*g).or_insert(0usize);
        conv_of[i + 1] = (*g, *k % lanes);
        conv_lines.entry((*g, *k % lanes)).or_default().push(i + 1);
        *k += 1;
    }
    let mut calls: HashMap<usize, Vec<&Value>> = HashMap::new();
    let mut seen = Seen::default();
    for body in bodies {
        let ms = body["messages"].as_array().expect("messages");
        let own = line_of(ms.last().and_then(|m| m["content"].as_str()).expect("turn"));
        let (g, k) = conv_of[own];
        assert_eq!(ms[0]["role"], "system");
        assert_eq!(
            ms[0]["content"].as_str(),
            Some(rubric(g).as_str()),
            "line {own}: its group's prompt"
        );
        let roles: Vec<&str> = ms[1..]
            .iter()
            .map(|m| m["role"].as_str().unwrap_or(""))
            .collect();
        for (i, r) in roles.iter().enumerate() {
            let want = if i % 2 == 0 { "user" } else { "assistant" };
            assert_eq!(*r, want, "line {own}: roles {roles:?}");
        }
        let history: Vec<(usize, &str)> = ms[1..ms.len() - 1]
            .chunks(2)
            .map(|p| {
                (
                    line_of(p[0]["content"].as_str().expect("user")),
                    p[1]["content"].as_str().expect("assistant"),
                )
            })
            .collect();
        for (j, answer) in &history {
            assert_eq!(
                conv_of[*j],
                (g, k),
                "line {own}: history line {j} is of another conversation"
            );
            assert!(*j < own, "line {own}: history line {j} comes later");
            assert!(
                !failed.contains_key(j),
                "line {own}: failed line {j} in the history"
            );
            let recorded = &answers.get(j).expect("a history line succeeded").0;
            assert_eq!(
                answer, recorded,
                "line {own}: line {j}'s answer is not the recorded one"
            );
        }
        let before: Vec<usize> = conv_lines[&(g, k)]
            .iter()
            .copied()
            .take_while(|l| *l < own)
            .filter(|l| answers.contains_key(l))
            .collect();
        match history.last() {
            Some((j, _)) => assert_eq!(
                Some(j),
                before.last(),
                "line {own}: the last turn is the previous success"
            ),
            None => assert!(before.is_empty(), "line {own}: sent alone after {before:?}"),
        }
        if history.len() < before.len() {
            seen.cut_calls += 1;
        }
        seen.longest_history = seen.longest_history.max(history.len());
        calls.entry(own).or_default().push(body);
    }
    for (line, cs) in &calls {
        for c in &cs[1..] {
            assert_eq!(
                c["messages"], cs[0]["messages"],
                "line {line}: a later call carried another context"
            );
        }
        if cs.len() > 1 {
            seen.called_again += 1;
        }
        // The answer's usage is the real prompt of the line's (last) call.
        if let Some((_, prompt)) = answers.get(line) {
            let last = cs.last().expect("a call");
            assert_eq!(
                *prompt,
                last.to_string().len() as u64 / 4,
                "line {line}: usage"
            );
        }
    }
    for i in 1..=n {
        assert!(calls.contains_key(&i), "line {i} was never sent");
    }
    seen
}

async fn create(api: &Api, file: Vec<u8>) -> String {
    let b = api
        .submit_with(
            file,
            "/v1/chat/completions",
            json!({"mode": "conversation"}),
        )
        .await;
    b["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_carry_their_recorded_history_within_the_context() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.keep_bodies.store(true, Ordering::SeqCst);
    fake.set(|b| {
        b.unique_answers = true;
        b.context_limit = Some(CONTEXT);
        b.refuse_marker = Some("REFUSE".into());
        b.busy_permille = 40;
    });
    let (_dir, server) = server_with(&fake, |c| {
        c.concurrency = 2;
        c.num_ctx = Some(CONTEXT as u32);
    })
    .await;
    let api = Api::new(&server.base);
    let (file, groups) = input(2, 40, 7);
    let id = create(&api, file).await;
    let done = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["metadata"]["mode"], "conversation");
    let bodies = fake.stats.bodies.lock().expect("lock").clone();
    let seen = check(&api, &done, &groups, 2, &bodies).await;
    println!(
        "{seen:?}; largest prompt {} of {CONTEXT}",
        fake.stats.max_prompt.load(Ordering::SeqCst)
    );
    assert_eq!(
        fake.stats.over_context.load(Ordering::SeqCst),
        0,
        "a call passed the context"
    );
    assert!(
        seen.cut_calls > 0,
        "the histories grew past the context and were cut: {seen:?}"
    );
    assert!(seen.longest_history >= 4, "the histories grew: {seen:?}");
    assert!(
        fake.stats.busy.load(Ordering::SeqCst) > 0,
        "retries were exercised"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_batch_is_refused_where_it_cannot_run() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_dir, server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let (status, f) = api.upload("x.jsonl", input(1, 2, 1).0, "batch").await;
    assert_eq!(status, 200);
    for (endpoint, mode, why) in [
        ("/v1/chat/completions", "conversation", "--num-ctx"),
        (
            "/v1/chat/completions",
            "chat",
            "must be 'independent' or 'conversation'",
        ),
        ("/v1/embeddings", "conversation", "chat completions only"),
    ] {
        let (status, e) = api
            .post(
                "/v1/batches",
                json!({"input_file_id": f["id"], "endpoint": endpoint,
                       "completion_window": "24h", "metadata": {"mode": mode}}),
            )
            .await;
        assert_eq!(status, 400, "{e}");
        assert_eq!(e["error"]["param"], "metadata.mode");
        let msg = e["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(why), "{msg}");
    }
    let (_, list) = api.get("/v1/batches").await;
    assert_eq!(
        list["data"].as_array().map(Vec::len),
        Some(0),
        "nothing was created"
    );
}

const LANES: usize = 3;

fn spawn(state: &Path, backend: &str) -> Proc {
    process::spawn(state, backend, LANES, &["--num-ctx", &CONTEXT.to_string()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_conversation_resumes_each_turn_with_its_recorded_context() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("conversation crash test: CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let fake = Fake::start(Shape::OpenAi).await;
    fake.keep_bodies.store(true, Ordering::SeqCst);
    fake.set(|b| {
        b.delay = Duration::from_millis(4);
        b.unique_answers = true;
        b.context_limit = Some(CONTEXT);
        b.refuse_marker = Some("REFUSE".into());
    });
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let mut p = spawn(&state, &fake.url());
    let mut api = Api::new(&p.addr);
    let (file, groups) = input(2, 90, seed);
    let id = create(&api, file).await;
    // Kill while lines run, until a kill has interrupted a conversation's turn that then ran
    // again (at least 4 kills, at most 12). No faults here: a line called twice was resumed.
    let mut kills = 0;
    let mut requeued = 0u64;
    loop {
        api.wait_for(&id, Duration::from_secs(60), "running", |b| {
            b["status"] != "validating"
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.u64(20..120))).await;
        let (_, b) = api.get(&format!("/v1/batches/{id}")).await;
        if b["status"] != "in_progress" {
            break;
        }
        p.child.kill().expect("kill");
        p.child.wait().expect("wait");
        kills += 1;
        p = spawn(&state, &fake.url());
        api = Api::new(&p.addr);
        let (_, status) = api.get("/status").await;
        let mine = status["batches"]
            .as_array()
            .and_then(|bs| bs.iter().find(|x| x["id"] == id.as_str()))
            .cloned();
        if let Some(b) = mine {
            assert_eq!(
                b["mode"], "conversation",
                "the mode survives a restart: {b}"
            );
        }
        requeued += p.requeued_at_start();
        let again = fake
            .stats
            .calls
            .lock()
            .expect("lock")
            .values()
            .filter(|c| **c > 1)
            .count();
        println!(
            "kill {kills}: {} done, {requeued} requeued so far, {again} lines called again",
            b["request_counts"]["completed"]
        );
        if kills >= 12 || (kills >= 4 && requeued > 0 && again > 0) {
            break;
        }
    }
    let done = api.wait_terminal(&id, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "completed", "{done}");
    let bodies = fake.stats.bodies.lock().expect("lock").clone();
    let seen = check(&api, &done, &groups, LANES, &bodies).await;
    println!("kills={kills} requeued={requeued} {seen:?}");
    assert!(kills >= 4, "the batch ended before 4 kills");
    assert!(requeued > 0, "no kill landed while a turn was in flight");
    assert!(seen.called_again > 0, "no turn ran again after a kill");
    assert_eq!(
        fake.stats.over_context.load(Ordering::SeqCst),
        0,
        "a call passed the context"
    );
    assert!(seen.cut_calls > 0, "histories were cut: {seen:?}");
    p.child.kill().expect("kill");
    p.child.wait().expect("wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_run_on_ollama_with_its_context_set() {
    let fake = Fake::start(Shape::Ollama).await;
    fake.keep_bodies.store(true, Ordering::SeqCst);
    fake.set(|b| {
        b.unique_answers = true;
        b.refuse_marker = Some("REFUSE".into());
    });
    let (_dir, server) = server_with(&fake, |c| {
        c.concurrency = 2;
        c.num_ctx = Some(8192);
    })
    .await;
    let api = Api::new(&server.base);
    let (file, groups) = input(1, 10, 3);
    let id = create(&api, file).await;
    let done = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed", "{done}");
    let bodies = fake.stats.bodies.lock().expect("lock").clone();
    for b in &bodies {
        assert_eq!(
            b["options"]["num_ctx"], 8192,
            "the same context on every call"
        );
    }
    let seen = check(&api, &done, &groups, 2, &bodies).await;
    // 10 lines in 2 conversations of 5 turns (one refused: line 4), none cut at 8,192 tokens.
    assert_eq!(seen.cut_calls, 0, "{seen:?}");
    assert_eq!(seen.longest_history, 4, "{seen:?}");
}

//! `ollama-batch calibrate`: measures, before a long run, which context length and how many
//! parallel requests really fit on this GPU with this model, instead of guessing (a wrong guess
//! is an out-of-memory crash hours in).
//!
//! It grows the context (Ollama `options.num_ctx`: 2K, 4K, … up to the model's maximum) and, at
//! each, the number of parallel requests, each request a prompt that really fills about 90 % of
//! the context (sized by a measured tokens-per-character ratio, with a unique opening so no
//! prompt cache can shorten it). Per step it records GPU memory (NVML's peak, Ollama's
//! `/api/ps` `size` and `size_vram`), prompt and generation rates, whether the backend truncated
//! the prompt (fewer prompt tokens reported than sent) or failed (out of memory, context
//! overflow, timeout). It stops at the first failure, a model spilled to the CPU, memory past
//! the safety margin, the time limit, or Ctrl-C, then prints and writes (JSON) the recommended
//! `--num-ctx` and `--concurrency` with the measurements behind them.
//!
//! With an OpenAI-compatible backend (llama.cpp) the context is fixed by the server
//! (`llama-server -c`), so only parallelism is measured, at the per-slot context `/props` reports.

use super::note;
use crate::backend::Backend;
use crate::config::{BackendArgs, BackendKind, parse_size};
use crate::domain::{CallResult, Endpoint};
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Flags of `calibrate`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Exit status: 0 a recommendation was made; 130 interrupted (what was \
measured is still written); 1 an error, or no step passed.\n\nSafe to run: steps and time are \
bounded, one step runs at a time, and Ctrl-C stops it between requests."
)]
pub struct CalibrateArgs {
    /// The model server (the first `--backend-url` is measured; `URL#SLOTS`, comma lists and
    /// the environment variables mean what they mean for `serve`).
    #[command(flatten)]
    pub backend: BackendArgs,
    /// The model to measure (the one the run will use).
    #[arg(long, env = "OLLAMA_BATCH_MODEL")]
    pub model: String,
    /// Context sizes to try, ascending (Ollama). Default: 2048, doubling up to --max-ctx.
    #[arg(long, value_delimiter = ',', value_name = "N,N,…")]
    pub contexts: Vec<u32>,
    /// Largest context to try. Default: the model's own maximum (Ollama `/api/show`), or 32768
    /// when it does not say.
    #[arg(long, value_name = "N")]
    pub max_ctx: Option<u32>,
    /// Parallel requests to try at each context, ascending.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8",
        value_name = "N,N,…"
    )]
    pub parallel: Vec<usize>,
    /// Stop when GPU memory in use passes this share of the GPU's memory.
    #[arg(long, default_value_t = 0.9)]
    pub margin: f64,
    /// The GPU's memory (e.g. 16GiB) where NVML cannot read it: the margin is then checked
    /// against Ollama's `/api/ps` size of the loaded model.
    #[arg(long, value_name = "SIZE")]
    pub gpu_memory: Option<String>,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: u32,
    /// Deadline of one request.
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub request_timeout: humantime::Duration,
    /// Deadline of the whole calibration.
    #[arg(long, default_value = "30m", value_name = "DURATION")]
    pub max_time: humantime::Duration,
    /// Where to write the measurements and the recommendation (JSON).
    #[arg(long, default_value = "calibration.json", value_name = "FILE")]
    pub json: PathBuf,
}

/// Why a step did not pass.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every request answered, untruncated, within the margin.
    Ok,
    /// The backend ran out of memory.
    Oom,
    /// The prompt did not fit the context (an error, or fewer prompt tokens seen than sent).
    Truncated,
    /// Part of the model moved to the CPU (`size_vram < size`).
    Spilled,
    /// GPU memory passed the safety margin.
    OverMargin,
    /// A request ran past --request-timeout.
    Timeout,
    /// Another error.
    Error,
}

/// One measured step.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Context size (`num_ctx`).
    pub num_ctx: u32,
    /// Requests sent at once (0: the warm-up that loads the model at this context).
    pub parallel: usize,
    /// What happened.
    pub outcome: Outcome,
    /// The error or reason, in words.
    pub detail: Option<String>,
    /// Prompt tokens each request was sized to.
    pub prompt_tokens_sent: u64,
    /// The fewest prompt tokens the backend reported for a request of the step.
    pub prompt_tokens_seen: Option<u64>,
    /// Wall time of the step.
    pub wall_s: f64,
    /// Requests per second over the step.
    pub requests_per_s: f64,
    /// Prompt tokens per second over the step (all requests).
    pub prompt_tokens_per_s: f64,
    /// Generated tokens per second over the step (all requests).
    pub gen_tokens_per_s: f64,
    /// Peak GPU memory in use during the step (NVML), bytes.
    pub gpu_peak_bytes: Option<u64>,
    /// Ollama `/api/ps`: the model's size, bytes.
    pub model_size_bytes: Option<u64>,
    /// Ollama `/api/ps`: the part of it in GPU memory, bytes.
    pub model_vram_bytes: Option<u64>,
}

/// What calibrate recommends.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Recommendation {
    /// `--num-ctx`.
    pub num_ctx: u32,
    /// `--concurrency`.
    pub concurrency: usize,
    /// Why, in words.
    pub why: String,
}

/// The whole report, as written to --json.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Backend kind.
    pub backend: &'static str,
    /// Backend URL.
    pub backend_url: String,
    /// Model.
    pub model: String,
    /// When (unix seconds).
    pub measured_at: i64,
    /// GPU devices NVML names, or why there are none.
    pub gpu: Value,
    /// Measured prompt tokens per character of the filler text.
    pub tokens_per_char: f64,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Why it stopped.
    pub stopped: String,
    /// The recommendation (none when no step passed).
    pub recommendation: Option<Recommendation>,
}

/// What one call gave.
struct Answer {
    prompt_tokens: u64,
    gen_tokens: u64,
}

/// A call that failed, classified: the shared out-of-memory classifier, the backend's
/// context-overflow answers, the deadline; the rest is an error.
fn classify(result: &CallResult, timeout: humantime::Duration) -> (Outcome, String) {
    match result {
        CallResult::Timeout => (Outcome::Timeout, format!("no answer within {timeout}")),
        CallResult::Answered { status, body, .. } | CallResult::Busy { status, body, .. } => {
            let message = crate::domain::outcome::error_message(body);
            let text = if message.is_empty() { body } else { &message };
            let lower = text.to_ascii_lowercase();
            let outcome = if crate::domain::outcome::is_oom_text(text) {
                Outcome::Oom
            } else if lower.contains("context")
                && (lower.contains("exceed")
                    || lower.contains("too long")
                    || lower.contains("overflow"))
            {
                Outcome::Truncated
            } else {
                Outcome::Error
            };
            (
                outcome,
                format!("{status}: {}", crate::domain::clip(text, 300)),
            )
        }
        CallResult::Invalid { message, .. } | CallResult::Rejected { message, .. } => {
            (Outcome::Error, crate::domain::clip(message, 300))
        }
        CallResult::Transport(e) | CallResult::Unreachable(e) => {
            (Outcome::Error, crate::domain::clip(e, 300))
        }
    }
}

/// The model server, through the one backend client (`src/backend`), as calibrate uses it.
struct Client {
    backend: Backend,
    model: String,
    timeout: humantime::Duration,
}

impl Client {
    /// One chat call with `prompt` at context `ctx` (Ollama's `num_ctx`; llama.cpp's is the
    /// server's), generating at most `generate` tokens.
    async fn call(
        &self,
        prompt: &str,
        ctx: u32,
        generate: u32,
    ) -> Result<Answer, (Outcome, String)> {
        let body = json!({"model": self.model, "max_tokens": generate, "temperature": 0,
                          "messages": [{"role": "user", "content": prompt}]});
        let backend = match self.backend.kind() {
            BackendKind::Ollama => self.backend.with_num_ctx(Some(ctx)),
            BackendKind::Openai => self.backend.clone(),
        };
        let result = backend.call(Endpoint::ChatCompletions, &body).await;
        match &result {
            CallResult::Answered { status, usage, .. } if (200..300).contains(status) => {
                let u = usage.unwrap_or_default();
                Ok(Answer {
                    prompt_tokens: u.input_tokens,
                    gen_tokens: u.output_tokens,
                })
            }
            other => Err(classify(other, self.timeout)),
        }
    }

    /// Ollama `/api/ps`: (size, size_vram) of the model, when loaded.
    async fn loaded(&self) -> Option<(u64, u64)> {
        if self.backend.kind() != BackendKind::Ollama {
            return None;
        }
        self.backend
            .ollama_ps()
            .await
            .ok()?
            .into_iter()
            .find(|m| m.name == self.model || m.name.starts_with(&self.model))
            .map(|m| (m.size_bytes, m.size_vram_bytes))
    }

    /// The model's largest context: Ollama `/api/show` `<arch>.context_length`.
    async fn model_max_ctx(&self) -> Option<u32> {
        self.backend.model_max_ctx(&self.model).await
    }

    /// llama.cpp `/props`: context per slot and slots.
    async fn llama_props(&self) -> Option<(u32, usize)> {
        self.backend
            .llama_props()
            .await
            .filter(|(n_ctx, _)| *n_ctx > 0)
            .map(|(n_ctx, slots)| (n_ctx, slots.max(1)))
    }
}

/// Words for the filler: ordinary text, so it tokenizes as prompts do.
const WORDS: [&str; 32] = [
    "candidate",
    "experience",
    "years",
    "project",
    "team",
    "software",
    "design",
    "managed",
    "delivery",
    "customer",
    "research",
    "analysis",
    "language",
    "model",
    "quality",
    "review",
    "systems",
    "built",
    "led",
    "growth",
    "data",
    "platform",
    "mentored",
    "shipped",
    "budget",
    "planning",
    "security",
    "testing",
    "cloud",
    "support",
    "strategy",
    "operations",
];

/// About `chars` characters of text opening with `tag` (unique per request, so no prompt cache
/// can shorten it).
fn filler(tag: &str, chars: usize, seed: u64) -> String {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut s = format!("{tag}. Read this text and answer OK.\n");
    while s.len() < chars {
        s.push_str(WORDS[rng.usize(..WORDS.len())]);
        s.push(if rng.u8(..12) == 0 { '\n' } else { ' ' });
    }
    s
}

/// The recommendation from the steps: the largest context at which a step passed, and there
/// the fewest parallel requests that reach 90 % of the best request rate measured at it.
pub fn recommend(steps: &[Step]) -> Option<Recommendation> {
    let ok: Vec<&Step> = steps
        .iter()
        .filter(|s| s.outcome == Outcome::Ok && s.parallel > 0)
        .collect();
    let ctx = ok.iter().map(|s| s.num_ctx).max()?;
    let at: Vec<&&Step> = ok.iter().filter(|s| s.num_ctx == ctx).collect();
    let best = at.iter().map(|s| s.requests_per_s).fold(0.0, f64::max);
    let pick = at
        .iter()
        .filter(|s| s.requests_per_s >= 0.9 * best)
        .min_by_key(|s| s.parallel)?;
    let most = at.iter().map(|s| s.parallel).max().unwrap_or(pick.parallel);
    Some(Recommendation {
        num_ctx: ctx,
        concurrency: pick.parallel,
        why: format!(
            "{ctx} is the largest context that passed; there {} parallel requests reach {:.0} % of the best rate measured ({:.2} requests/s, tried up to {most})",
            pick.parallel,
            if best > 0.0 {
                pick.requests_per_s * 100.0 / best
            } else {
                100.0
            },
            best
        ),
    })
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn table(steps: &[Step]) -> String {
    let mut s = format!(
        "{:>8} {:>8}  {:<11} {:>15} {:>8} {:>11} {:>9} {:>10} {:>21}\n",
        "num_ctx",
        "parallel",
        "outcome",
        "prompt sent/seen",
        "req/s",
        "prompt t/s",
        "gen t/s",
        "GPU peak",
        "model size (in VRAM)"
    );
    for st in steps {
        let outcome = serde_json::to_value(&st.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let par = if st.parallel == 0 {
            "load".to_string()
        } else {
            st.parallel.to_string()
        };
        s.push_str(&format!(
            "{:>8} {:>8}  {:<11} {:>15} {:>8.2} {:>11.0} {:>9.1} {:>10} {:>21}\n",
            st.num_ctx,
            par,
            outcome,
            format!(
                "{}/{}",
                st.prompt_tokens_sent,
                st.prompt_tokens_seen
                    .map(|n| n.to_string())
                    .unwrap_or("-".into())
            ),
            st.requests_per_s,
            st.prompt_tokens_per_s,
            st.gen_tokens_per_s,
            st.gpu_peak_bytes.map(gib).unwrap_or("-".into()),
            match (st.model_size_bytes, st.model_vram_bytes) {
                (Some(a), Some(b)) => format!("{} ({})", gib(a), gib(b)),
                _ => "-".into(),
            }
        ));
        if let Some(d) = &st.detail
            && st.outcome != Outcome::Ok
        {
            s.push_str(&format!("{:>19}{d}\n", ""));
        }
    }
    s
}

/// Runs the calibration; the exit code.
pub async fn calibrate(args: &CalibrateArgs) -> u8 {
    let interrupted = CancellationToken::new();
    if let Err(e) = super::term::watch_interrupts(interrupted.clone()) {
        note(&format!("ollama-batch: {e}"));
        return 1;
    }
    match measure(args, &interrupted).await {
        Ok(report) => {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{}", table(&report.steps));
            let _ = writeln!(out, "stopped: {}", report.stopped);
            match &report.recommendation {
                Some(r) if args.backend.backend == BackendKind::Openai => {
                    let _ = writeln!(
                        out,
                        "recommended: --concurrency {} (at the server's context of {} tokens per request; the server's -c and -np set it)\n  ({})",
                        r.concurrency, r.num_ctx, r.why
                    );
                }
                Some(r) => {
                    let _ = writeln!(
                        out,
                        "recommended: --num-ctx {} --concurrency {}\n  ({})",
                        r.num_ctx, r.concurrency, r.why
                    );
                    if args.backend.backend == BackendKind::Ollama {
                        let _ = writeln!(
                            out,
                            "  Ollama runs at most OLLAMA_NUM_PARALLEL requests at once (its default is 1 or 4 by memory); set it to at least the concurrency. A smaller --num-ctx that still holds your longest prompt plus its answer leaves memory for more parallel requests."
                        );
                    }
                }
                None => {
                    let _ = writeln!(out, "no recommendation: no step passed");
                }
            }
            let written = serde_json::to_vec_pretty(&report)
                .map_err(|e| e.to_string())
                .and_then(|b| std::fs::write(&args.json, b).map_err(|e| e.to_string()));
            match written {
                Ok(()) => {
                    let _ = writeln!(out, "written: {}", args.json.display());
                }
                Err(e) => {
                    note(&format!(
                        "ollama-batch: cannot write {}: {e}",
                        args.json.display()
                    ));
                    return 1;
                }
            }
            if interrupted.is_cancelled() {
                130
            } else if report.recommendation.is_some() {
                0
            } else {
                1
            }
        }
        Err(e) => {
            note(&format!("ollama-batch: {e}"));
            1
        }
    }
}

/// The measurement loop.
async fn measure(args: &CalibrateArgs, interrupted: &CancellationToken) -> Result<Report, String> {
    if !(0.1..=1.0).contains(&args.margin) {
        return Err("--margin must be between 0.1 and 1.0 (a share of GPU memory)".into());
    }
    if args.parallel.is_empty() || args.parallel.contains(&0) {
        return Err("--parallel takes counts of 1 or more".into());
    }
    let urls = args.backend.urls()?;
    let url = &urls[0].0;
    if urls.len() > 1 {
        note(&format!(
            "{} model servers given: calibrating the first, {url} (run calibrate once per server)",
            urls.len()
        ));
    }
    let deadline = Instant::now() + *args.max_time;
    let backend = Backend::connect(
        args.backend.backend,
        url,
        args.backend.backend_api_key.as_ref(),
        args.backend.ca_pem()?.as_deref(),
        *args.request_timeout,
    )?
    .with_keep_alive(json!("10m"));
    let client = Client {
        backend,
        model: args.model.clone(),
        timeout: args.request_timeout,
    };
    let sampler = crate::gpu::PeakSampler::start();
    let gpu_total = match (&sampler, &args.gpu_memory) {
        (Ok(s), _) => Some(s.total()),
        (Err(_), Some(m)) => Some(parse_size(m).map_err(|e| format!("--gpu-memory: {e}"))?),
        (Err(_), None) => None,
    };
    let gpu = match &sampler {
        Ok(s) => json!({"source": "nvml", "devices": s.names(), "total_bytes": s.total()}),
        Err(reason) => {
            json!({"source": if gpu_total.is_some() { "--gpu-memory" } else { "none" },
                   "unavailable_reason": reason, "total_bytes": gpu_total})
        }
    };
    if let Err(reason) = &sampler {
        note(&format!(
            "GPU memory: {reason}; {}",
            if gpu_total.is_some() {
                "the margin is checked against Ollama's /api/ps sizes and --gpu-memory"
            } else {
                "no margin check (pass --gpu-memory with Ollama to have one)"
            }
        ));
    }
    // The contexts, and the parallel levels.
    let (contexts, parallel) = match args.backend.backend {
        BackendKind::Ollama => {
            let contexts = if args.contexts.is_empty() {
                let max = match args.max_ctx {
                    Some(m) => m,
                    None => client.model_max_ctx().await.unwrap_or(32768),
                };
                let mut c = vec![];
                let mut n = 2048u32;
                while n <= max {
                    c.push(n);
                    n = n.saturating_mul(2);
                }
                if c.is_empty() {
                    c.push(max);
                }
                c
            } else {
                let mut c = args.contexts.clone();
                c.sort_unstable();
                c.dedup();
                c
            };
            (contexts, args.parallel.clone())
        }
        BackendKind::Openai => match client.llama_props().await {
            Some((n_ctx, slots)) => {
                note(&format!(
                    "llama.cpp: {slots} slots of {n_ctx} tokens (set by llama-server -c and -np); measuring parallel requests only"
                ));
                (vec![n_ctx], args.parallel.clone())
            }
            None => match args.contexts.first() {
                Some(&c) => (vec![c], args.parallel.clone()),
                None => {
                    return Err("the backend has no /props (not llama.cpp?): pass --contexts with the context per request the server gives".into());
                }
            },
        },
    };
    note(&format!(
        "calibrating {} on {}: contexts {:?}, parallel {:?}, margin {:.0} %, at most {}",
        args.model,
        url,
        contexts,
        parallel,
        args.margin * 100.0,
        args.max_time
    ));
    let mut report = Report {
        backend: args.backend.backend.as_str(),
        backend_url: crate::domain::redact_urls(url),
        model: args.model.clone(),
        measured_at: crate::domain::unix_now(),
        gpu,
        tokens_per_char: 0.0,
        steps: Vec::new(),
        stopped: String::new(),
        recommendation: None,
    };
    // Tokens per character, measured once on the filler text.
    let probe = filler("probe", 2000, 1);
    let ratio = tokio::select! {
        r = client.call(&probe, contexts[0], 1) => r,
        _ = interrupted.cancelled() => {
            report.stopped = "interrupted".into();
            return Ok(report);
        }
    };
    match ratio {
        Ok(a) if a.prompt_tokens > 0 => {
            report.tokens_per_char = a.prompt_tokens as f64 / probe.len() as f64;
        }
        Ok(_) => {
            report.tokens_per_char = 0.25;
            note("the backend reports no prompt tokens: prompts sized at 4 characters a token");
        }
        Err((_, e)) => return Err(format!("the first request failed: {e}")),
    }
    let mut seed = 100;
    'contexts: for &ctx in &contexts {
        // Warm-up: loads the model at this context (a reload in Ollama), alone.
        let mut steps_here = vec![0usize];
        steps_here.extend(parallel.iter().copied());
        for p in steps_here {
            if Instant::now() >= deadline {
                report.stopped = format!("time limit ({}) reached", args.max_time);
                break 'contexts;
            }
            if let Ok(s) = &sampler {
                s.reset();
            }
            let target = if p == 0 {
                16
            } else {
                ((ctx as f64 * 0.9) as u64).saturating_sub(args.gen_tokens as u64 + 32)
            };
            let chars = (target as f64 / report.tokens_per_char.max(0.01)) as usize;
            let prompts: Vec<String> = (0..p.max(1))
                .map(|i| {
                    seed += 1;
                    filler(&format!("Request {ctx}-{p}-{i}-{seed}"), chars, seed)
                })
                .collect();
            let generate = if p == 0 { 1 } else { args.gen_tokens };
            let started = Instant::now();
            let calls = futures_util::future::join_all(
                prompts.iter().map(|pr| client.call(pr, ctx, generate)),
            );
            let results = tokio::select! {
                r = calls => r,
                _ = interrupted.cancelled() => {
                    report.stopped = "interrupted (Ctrl-C)".into();
                    break 'contexts;
                }
            };
            let wall = started.elapsed().as_secs_f64().max(1e-6);
            let loaded = client.loaded().await;
            let mut step = Step {
                num_ctx: ctx,
                parallel: p,
                outcome: Outcome::Ok,
                detail: None,
                prompt_tokens_sent: target,
                prompt_tokens_seen: None,
                wall_s: wall,
                requests_per_s: 0.0,
                prompt_tokens_per_s: 0.0,
                gen_tokens_per_s: 0.0,
                gpu_peak_bytes: sampler.as_ref().ok().map(|s| s.peak()),
                model_size_bytes: loaded.map(|l| l.0),
                model_vram_bytes: loaded.map(|l| l.1),
            };
            let mut answers = Vec::new();
            for r in results {
                match r {
                    Ok(a) => answers.push(a),
                    Err((o, d)) if step.outcome == Outcome::Ok => {
                        step.outcome = o;
                        step.detail = Some(d);
                    }
                    Err(_) => {}
                }
            }
            step.prompt_tokens_seen = answers.iter().map(|a| a.prompt_tokens).min();
            step.requests_per_s = answers.len() as f64 / wall;
            step.prompt_tokens_per_s =
                answers.iter().map(|a| a.prompt_tokens).sum::<u64>() as f64 / wall;
            step.gen_tokens_per_s = answers.iter().map(|a| a.gen_tokens).sum::<u64>() as f64 / wall;
            if step.outcome == Outcome::Ok
                && p > 0
                && let Some(seen) = step.prompt_tokens_seen
                && seen > 0
                && (seen as f64) < 0.8 * target as f64
            {
                step.outcome = Outcome::Truncated;
                step.detail = Some(format!(
                    "sent about {target} prompt tokens, the backend saw {seen}: it cut the prompt (its context is smaller than num_ctx {ctx})"
                ));
            }
            if step.outcome == Outcome::Ok
                && let Some((size, vram)) = loaded
                && vram < size
            {
                step.outcome = Outcome::Spilled;
                step.detail = Some(format!(
                    "{} of the model's {} moved to the CPU (several times slower)",
                    gib(size - vram),
                    gib(size)
                ));
            }
            if step.outcome == Outcome::Ok
                && let Some(total) = gpu_total
            {
                let used = step.gpu_peak_bytes.or(step.model_size_bytes);
                if let Some(used) = used
                    && used as f64 > args.margin * total as f64
                {
                    step.outcome = Outcome::OverMargin;
                    step.detail = Some(format!(
                        "{} in use of {} is past the {:.0} % margin",
                        gib(used),
                        gib(total),
                        args.margin * 100.0
                    ));
                }
            }
            note(&format!(
                "num_ctx {ctx} parallel {}: {:?}{}",
                if p == 0 {
                    "load".to_string()
                } else {
                    p.to_string()
                },
                step.outcome,
                step.detail
                    .as_ref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ));
            let failed = step.outcome != Outcome::Ok;
            report.steps.push(step);
            if failed {
                report.stopped = format!("first failure at num_ctx {ctx}");
                break 'contexts;
            }
        }
    }
    if report.stopped.is_empty() {
        report.stopped = "every step passed".into();
    }
    report.recommendation = recommend(&report.steps);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(ctx: u32, p: usize, rps: f64, outcome: Outcome) -> Step {
        Step {
            num_ctx: ctx,
            parallel: p,
            outcome,
            detail: None,
            prompt_tokens_sent: 0,
            prompt_tokens_seen: None,
            wall_s: 1.0,
            requests_per_s: rps,
            prompt_tokens_per_s: 0.0,
            gen_tokens_per_s: 0.0,
            gpu_peak_bytes: None,
            model_size_bytes: None,
            model_vram_bytes: None,
        }
    }

    #[test]
    fn recommends_the_largest_passing_context_and_the_fewest_requests_near_the_best_rate() {
        let steps = vec![
            step(2048, 0, 0.0, Outcome::Ok),
            step(2048, 1, 1.0, Outcome::Ok),
            step(2048, 2, 2.0, Outcome::Ok),
            step(4096, 1, 0.5, Outcome::Ok),
            step(4096, 2, 0.95, Outcome::Ok),
            step(4096, 4, 1.0, Outcome::Ok),
            step(4096, 8, 1.02, Outcome::Ok),
            step(8192, 0, 0.0, Outcome::Oom),
        ];
        let r = recommend(&steps).expect("one");
        assert_eq!((r.num_ctx, r.concurrency), (4096, 2), "{}", r.why);
        assert_eq!(recommend(&[step(2048, 0, 0.0, Outcome::Ok)]), None);
        assert_eq!(recommend(&[step(2048, 1, 1.0, Outcome::Oom)]), None);
    }

    #[test]
    fn errors_are_classified() {
        let t: humantime::Duration = std::time::Duration::from_secs(1).into();
        let answer = |status: u16, body: &str| CallResult::Answered {
            status,
            body: body.to_string(),
            usage: None,
        };
        assert_eq!(
            classify(&answer(500, r#"{"error":"CUDA error: out of memory"}"#), t).0,
            Outcome::Oom
        );
        // Every phrase of the shared classifier counts, not a private list.
        assert_eq!(
            classify(&answer(500, "insufficient memory for the KV cache"), t).0,
            Outcome::Oom
        );
        assert_eq!(
            classify(
                &answer(
                    400,
                    r#"{"error":{"message":"the request exceeds the available context size, try increasing it"}}"#
                ),
                t
            )
            .0,
            Outcome::Truncated
        );
        assert_eq!(classify(&answer(500, "boom"), t).0, Outcome::Error);
        assert_eq!(classify(&CallResult::Timeout, t).0, Outcome::Timeout);
    }

    #[test]
    fn filler_is_unique_and_long_enough() {
        let a = filler("A", 1000, 1);
        let b = filler("B", 1000, 2);
        assert!(a.len() >= 1000 && b.len() >= 1000);
        assert_ne!(a[..40], b[..40]);
    }
}

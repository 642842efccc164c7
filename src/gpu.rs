//! GPU memory, read off the request path: NVML (`nvml-wrapper`) is initialised once, on its own
//! thread, and sampled every few seconds; readers take the last sample. Where NVML cannot be
//! loaded (no NVIDIA driver, no GPU) the reason is kept and shown instead of zeros. For Ollama,
//! `GET /api/ps` says where each loaded model lives: `size_vram < size` means part of it spilled
//! to the CPU, which makes a run several times slower; that is logged once per model.

use serde::Serialize;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

/// How often NVML is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(3);

/// One GPU process as NVML lists it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GpuProcess {
    /// Its process id.
    pub pid: u32,
    /// Its name (`/proc/<pid>/comm`), e.g. `ollama` or `llama-server`.
    pub name: Option<String>,
    /// GPU memory it uses, when the driver says.
    pub used_bytes: Option<u64>,
}

/// One device's memory.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GpuDevice {
    /// NVML index.
    pub index: u32,
    /// e.g. "NVIDIA GeForce RTX 4080".
    pub name: String,
    /// Used now.
    pub used_bytes: u64,
    /// Total.
    pub total_bytes: u64,
    /// The most used since start.
    pub peak_used_bytes: u64,
    /// Compute processes on it (the backend among them).
    pub processes: Vec<GpuProcess>,
}

/// A model Ollama has loaded (`/api/ps`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LoadedModel {
    /// Its name.
    pub name: String,
    /// Bytes in all (weights, KV cache, graph).
    pub size_bytes: u64,
    /// Bytes in GPU memory.
    pub size_vram_bytes: u64,
    /// Bytes that spilled to the CPU (`size - size_vram`).
    pub on_cpu_bytes: u64,
    /// The context it was loaded with, when Ollama says.
    pub context_length: Option<u64>,
}

/// What is known of GPU memory.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GpuView {
    /// Whether NVML readings exist.
    pub available: bool,
    /// Why not, when not.
    pub unavailable_reason: Option<String>,
    /// Per device.
    pub devices: Vec<GpuDevice>,
    /// Unix seconds of the last reading.
    pub sampled_at: Option<i64>,
    /// Ollama's loaded models (empty for other backends or before the first poll).
    pub loaded_models: Vec<LoadedModel>,
}

/// The shared GPU view and the thread that keeps it.
#[derive(Debug)]
pub struct GpuMonitor {
    view: Mutex<GpuView>,
    warned_spill: Mutex<Vec<String>>,
    stop: Mutex<Option<mpsc::Sender<()>>>,
}

impl GpuMonitor {
    /// A monitor that is told readings (tests, and the start before the first sample).
    pub fn new() -> GpuMonitor {
        GpuMonitor {
            view: Mutex::new(GpuView {
                available: false,
                unavailable_reason: Some("not read yet".into()),
                devices: Vec::new(),
                sampled_at: None,
                loaded_models: Vec::new(),
            }),
            warned_spill: Mutex::new(Vec::new()),
            stop: Mutex::new(None),
        }
    }

    /// Starts the NVML thread. Without NVML the view says why and the thread ends.
    pub fn start() -> std::sync::Arc<GpuMonitor> {
        let m = std::sync::Arc::new(GpuMonitor::new());
        let (tx, rx) = mpsc::channel::<()>();
        *m.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let weak = std::sync::Arc::downgrade(&m);
        let spawned = std::thread::Builder::new()
            .name("gpu-monitor".into())
            .spawn(move || run(weak, rx));
        if let Err(e) = spawned {
            m.set_unavailable(format!("cannot start the GPU monitor thread: {e}"));
        }
        m
    }

    /// Stops the thread (at the next tick).
    pub fn stop(&self) {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn set_unavailable(&self, reason: String) {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        v.available = false;
        v.unavailable_reason = Some(reason);
        v.devices.clear();
    }

    /// The view now.
    pub fn view(&self) -> GpuView {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One line for logs: "GPU0 10.2/16.0 GiB (peak 11.0 GiB)" or "unavailable".
    pub fn summary(&self) -> String {
        let v = self.view();
        if !v.available {
            // The reason is logged once at start and shown in /status; a progress line every
            // few seconds need not repeat 150 characters of it.
            return "unavailable".into();
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        v.devices
            .iter()
            .map(|d| {
                format!(
                    "GPU{} {:.1}/{:.1} GiB (peak {:.1})",
                    d.index,
                    gib(d.used_bytes),
                    gib(d.total_bytes),
                    gib(d.peak_used_bytes)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The largest used-memory peak over the devices, when known.
    pub fn peak_used_bytes(&self) -> Option<u64> {
        let v = self.view();
        v.available
            .then(|| v.devices.iter().map(|d| d.peak_used_bytes).max())
            .flatten()
    }

    /// Records Ollama's `/api/ps` answer; warns once per model that spilled to the CPU.
    pub fn set_loaded_models(&self, models: Vec<LoadedModel>) {
        for m in models.iter().filter(|m| m.on_cpu_bytes > 0) {
            let mut warned = self.warned_spill.lock().unwrap_or_else(|p| p.into_inner());
            if !warned.contains(&m.name) {
                warned.push(m.name.clone());
                tracing::warn!(
                    model = %m.name,
                    size_bytes = m.size_bytes,
                    size_vram_bytes = m.size_vram_bytes,
                    on_cpu_bytes = m.on_cpu_bytes,
                    "part of the model runs on the CPU (Ollama /api/ps: size_vram < size): the run will be several times slower; lower --num-ctx or OLLAMA_NUM_PARALLEL (Ollama allocates the KV cache of all its parallel slots when it loads the model, whatever ollama-batch sends), or use a smaller quantization"
                );
            }
        }
        self.view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .loaded_models = models;
    }
}

impl Default for GpuMonitor {
    fn default() -> Self {
        GpuMonitor::new()
    }
}

/// Parses Ollama's `/api/ps` answer.
pub fn parse_ps(v: &serde_json::Value) -> Vec<LoadedModel> {
    v["models"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let size = m["size"].as_u64().unwrap_or(0);
                    let vram = m["size_vram"].as_u64().unwrap_or(0);
                    LoadedModel {
                        name: m["name"]
                            .as_str()
                            .or_else(|| m["model"].as_str())
                            .unwrap_or_default()
                            .to_string(),
                        size_bytes: size,
                        size_vram_bytes: vram,
                        on_cpu_bytes: size.saturating_sub(vram),
                        context_length: m["context_length"].as_u64(),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn run(monitor: std::sync::Weak<GpuMonitor>, stop: mpsc::Receiver<()>) {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            let reason = format!("NVML cannot be loaded (no NVIDIA driver or no GPU): {e}");
            tracing::info!(%reason, "no GPU memory readings");
            if let Some(m) = monitor.upgrade() {
                m.set_unavailable(reason);
            }
            return;
        }
    };
    let mut peaks: Vec<u64> = Vec::new();
    loop {
        let Some(m) = monitor.upgrade() else { return };
        let count = match nvml.device_count() {
            Ok(c) => c,
            Err(e) => {
                m.set_unavailable(format!("NVML cannot count devices: {e}"));
                0
            }
        };
        let mut devices = Vec::new();
        for i in 0..count {
            let Ok(d) = nvml.device_by_index(i) else {
                continue;
            };
            let Ok(mem) = d.memory_info() else { continue };
            if peaks.len() <= i as usize {
                peaks.resize(i as usize + 1, 0);
            }
            peaks[i as usize] = peaks[i as usize].max(mem.used);
            let processes = d
                .running_compute_processes()
                .unwrap_or_default()
                .into_iter()
                .map(|p| GpuProcess {
                    pid: p.pid,
                    name: process_name(p.pid),
                    used_bytes: match p.used_gpu_memory {
                        nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => Some(b),
                        nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
                    },
                })
                .collect();
            devices.push(GpuDevice {
                index: i,
                name: d.name().unwrap_or_default(),
                used_bytes: mem.used,
                total_bytes: mem.total,
                peak_used_bytes: peaks[i as usize],
                processes,
            });
        }
        if count > 0 {
            let mut v = m.view.lock().unwrap_or_else(|p| p.into_inner());
            v.available = !devices.is_empty();
            v.unavailable_reason = devices
                .is_empty()
                .then(|| "NVML lists no readable device".to_string());
            v.devices = devices;
            v.sampled_at = Some(crate::domain::unix_now());
        } else if m.view().unavailable_reason.as_deref() == Some("not read yet") {
            m.set_unavailable("NVML lists no GPU".into());
        }
        drop(m);
        match stop.recv_timeout(SAMPLE_EVERY) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// Samples used GPU memory (summed over the devices) every 200 ms on its own thread and keeps
/// the peak since the last [`PeakSampler::reset`]: short steps (calibrate) need finer readings
/// than the monitor's. Stops when dropped.
pub struct PeakSampler {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    total: u64,
    names: Vec<String>,
    _stop: mpsc::Sender<()>,
}

impl PeakSampler {
    /// Starts sampling; `Err(reason)` where NVML cannot be read.
    pub fn start() -> Result<PeakSampler, String> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let nvml = nvml_wrapper::Nvml::init()
            .map_err(|e| format!("NVML cannot be loaded (no NVIDIA driver or no GPU): {e}"))?;
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML cannot count devices: {e}"))?;
        let mut total = 0;
        let mut names = Vec::new();
        for i in 0..count {
            let d = nvml
                .device_by_index(i)
                .map_err(|e| format!("NVML cannot open device {i}: {e}"))?;
            total += d
                .memory_info()
                .map_err(|e| format!("NVML cannot read device {i}: {e}"))?
                .total;
            names.push(d.name().unwrap_or_default());
        }
        if count == 0 {
            return Err("NVML lists no GPU".into());
        }
        let peak = std::sync::Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel::<()>();
        let p = peak.clone();
        std::thread::Builder::new()
            .name("gpu-peak".into())
            .spawn(move || {
                loop {
                    let used: u64 = (0..count)
                        .filter_map(|i| nvml.device_by_index(i).ok())
                        .filter_map(|d| d.memory_info().ok())
                        .map(|m| m.used)
                        .sum();
                    p.fetch_max(used, Ordering::Relaxed);
                    match rx.recv_timeout(Duration::from_millis(200)) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })
            .map_err(|e| format!("cannot start the sampling thread: {e}"))?;
        Ok(PeakSampler {
            peak,
            total,
            names,
            _stop: tx,
        })
    }

    /// Forgets the peak so far.
    pub fn reset(&self) {
        self.peak.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The peak of used memory since the last reset, in bytes.
    pub fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Memory of all the devices, in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The devices' names.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_spill_is_seen() {
        let v = serde_json::json!({"models": [{"name": "gemma3:12b", "size": 12_000, "size_vram": 9_000, "context_length": 8192}]});
        let ms = parse_ps(&v);
        assert_eq!(ms[0].on_cpu_bytes, 3_000);
        assert_eq!(ms[0].context_length, Some(8192));
        let m = GpuMonitor::new();
        m.set_loaded_models(ms);
        assert_eq!(m.view().loaded_models.len(), 1);
        assert!(m.summary().starts_with("unavailable"));
    }
}

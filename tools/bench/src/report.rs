//! The printed table and the JSON record.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::{LinuxResult, Measured, Stats};

/// Targets from the issue: (first output ms, exit ms, RSS MiB), all "less than".
const TARGET_FIRST_MS: f64 = 4.0;
const TARGET_EXIT_MS: f64 = 10.0;
const TARGET_RSS_MIB: f64 = 3.0;

/// Figures measured earlier on this machine type with a ~200-byte PVH guest
/// that prints a line and resets through the i8042.
struct Reference {
    name: &'static str,
    key: &'static str,
    first_ms: f64,
    exit_ms: f64,
    rss_mib: f64,
}

const REFERENCES: [Reference; 2] = [
    Reference {
        name: "Firecracker",
        key: "firecracker",
        first_ms: 10.7,
        exit_ms: 33.5,
        rss_mib: 4.1,
    },
    Reference {
        name: "Cloud Hypervisor",
        key: "cloud_hypervisor",
        first_ms: 6.7,
        exit_ms: 22.9,
        rss_mib: 6.6,
    },
];

/// The host the numbers come from.
pub struct Machine {
    pub host_kernel: String,
    pub kvm_pvm: bool,
    pub cpu_model: String,
    pub cpus: usize,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
}

impl Machine {
    pub fn probe() -> Machine {
        let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let kvm_pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let root = crate::repo_root();
        let git = |args: &[&str]| {
            Command::new("git")
                .arg("-C")
                .arg(&root)
                .args(args)
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
        };
        let git_commit = git(&["rev-parse", "HEAD"])
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let git_dirty = if git_commit.is_some() {
            git(&["status", "--porcelain", "--untracked-files=no"])
                .filter(|o| o.status.success())
                .map(|o| !o.stdout.is_empty())
        } else {
            None
        };
        Machine {
            host_kernel,
            kvm_pvm,
            cpu_model,
            cpus,
            git_commit,
            git_dirty,
        }
    }

    /// `Linux 6.x, kvm_pvm (software KVM), CPU (2 CPUs), commit abc (+ uncommitted changes)`.
    pub fn summary(&self) -> String {
        format!(
            "Linux {}, {}, {} ({} CPUs), commit {}{}",
            self.host_kernel,
            if self.kvm_pvm {
                "kvm_pvm (software KVM)"
            } else {
                "hardware KVM"
            },
            self.cpu_model,
            self.cpus,
            self.git_commit
                .as_deref()
                .map(|c| &c[..c.len().min(12)])
                .unwrap_or("unknown"),
            if self.git_dirty == Some(true) {
                " (+ uncommitted changes)"
            } else {
                ""
            }
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "host_kernel": self.host_kernel,
            "kvm_pvm": self.kvm_pvm,
            "cpu_model": self.cpu_model,
            "cpus": self.cpus,
            "git_commit": self.git_commit,
            "git_dirty": self.git_dirty,
        })
    }
}

pub struct Report {
    pub runs: usize,
    pub unikernel: PathBuf,
    pub machine: Machine,
    pub ours: Measured,
    pub baseline: Option<Measured>,
    pub linux: Option<LinuxResult>,
}

/// One row: label, key, unit, stats, target, reference figure picker.
struct Row<'a> {
    label: &'static str,
    key: &'static str,
    unit: &'static str,
    stats: &'a Stats,
    target: Option<f64>,
    reference: Option<fn(&Reference) -> f64>,
}

fn rows(m: &Measured) -> Vec<Row<'_>> {
    vec![
        Row {
            label: "start -> first output",
            key: "first_output_ms",
            unit: "ms",
            stats: &m.first_output_ms,
            target: Some(TARGET_FIRST_MS),
            reference: Some(|r| r.first_ms),
        },
        Row {
            label: "start -> exit",
            key: "exit_ms",
            unit: "ms",
            stats: &m.exit_ms,
            target: Some(TARGET_EXIT_MS),
            reference: Some(|r| r.exit_ms),
        },
        Row {
            label: "RSS outside guest RAM",
            key: "rss_outside_guest_mib",
            unit: "MiB",
            stats: &m.rss_outside_mib,
            target: Some(TARGET_RSS_MIB),
            reference: Some(|r| r.rss_mib),
        },
        Row {
            label: "guest RAM RSS (record)",
            key: "guest_ram_rss_mib",
            unit: "MiB",
            stats: &m.guest_rss_mib,
            target: None,
            reference: None,
        },
        Row {
            label: "VmRSS total (record)",
            key: "vmrss_mib",
            unit: "MiB",
            stats: &m.vmrss_mib,
            target: None,
            reference: None,
        },
    ]
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

impl Report {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "tern-bench boot");
        let _ = writeln!(s, "host: {}", m.summary());
        let _ = writeln!(s, "tern: {}", self.ours.tern.display());
        let _ = writeln!(
            s,
            "guest: {} (action=i8042, 64 MiB; RSS: action=halt, 128 MiB)",
            self.unikernel.display()
        );
        let _ = writeln!(
            s,
            "runs: {} boots, {} RSS samples (median / min / max; ratio = ours / theirs, < 1 is better)",
            self.runs,
            self.ours.rss_outside_mib.samples.len()
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<28} {:>8} {:>8} {:>8}  {:>10}  {:>16}  {:>16}",
            "metric", "median", "min", "max", "target", REFERENCES[0].name, REFERENCES[1].name
        );
        for r in rows(&self.ours) {
            let med = r.stats.median();
            let target = match r.target {
                Some(t) => format!("< {t} {}", if med < t { "ok" } else { "MISS" }),
                None => "-".into(),
            };
            let refs: Vec<String> = REFERENCES
                .iter()
                .map(|rf| match r.reference {
                    Some(f) => format!("{:.1} ({:.2}x)", f(rf), med / f(rf)),
                    None => "-".into(),
                })
                .collect();
            let _ = writeln!(
                s,
                "{:<28} {:>8.2} {:>8.2} {:>8.2}  {:>10}  {:>16}  {:>16}",
                format!("{} ({})", r.label, r.unit),
                med,
                r.stats.min(),
                r.stats.max(),
                target,
                refs[0],
                refs[1]
            );
        }
        if let Some(b) = &self.baseline {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "baseline: {} (runs interleaved with ours)",
                b.tern.display()
            );
            let _ = writeln!(
                s,
                "{:<28} {:>8} {:>8} {:>8}  {:>14}",
                "metric", "median", "min", "max", "ours/baseline"
            );
            for (o, r) in rows(&self.ours).into_iter().zip(rows(b)) {
                let _ = writeln!(
                    s,
                    "{:<28} {:>8.2} {:>8.2} {:>8.2}  {:>13.3}x",
                    format!("{} ({})", r.label, r.unit),
                    r.stats.median(),
                    r.stats.min(),
                    r.stats.max(),
                    o.stats.median() / r.stats.median()
                );
            }
        }
        if let Some(l) = &self.linux {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "Linux guest kit ({} run{}, vmlinux PVH + initramfs, 512 MiB):",
                l.marker_ms.samples.len(),
                if l.marker_ms.samples.len() == 1 {
                    ""
                } else {
                    "s"
                }
            );
            let _ = writeln!(
                s,
                "{:<40} {:>10} {:>10} {:>10}",
                "metric", "median", "min", "max"
            );
            let mut line = |label: &str, st: &Stats| {
                if !st.samples.is_empty() {
                    let _ = writeln!(
                        s,
                        "{:<40} {:>10.2} {:>10.2} {:>10.2}",
                        format!("{label} (ms)"),
                        st.median(),
                        st.min(),
                        st.max()
                    );
                }
            };
            line("start -> first console line", &l.first_output_ms);
            line(&format!("start -> \"{}\"", l.marker), &l.marker_ms);
            line("start -> exit (power-off)", &l.exit_ms);
            for n in &l.notes {
                let _ = writeln!(s, "note: {n}");
            }
        }
        s
    }

    pub fn json(&self) -> Value {
        let metrics = |m: &Measured, with_refs: bool| {
            let mut o = serde_json::Map::new();
            for r in rows(m) {
                let med = r.stats.median();
                let mut v = json!({
                    "unit": r.unit,
                    "median": round3(med),
                    "min": round3(r.stats.min()),
                    "max": round3(r.stats.max()),
                    "samples": r.stats.samples.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
                });
                if with_refs {
                    if let Some(t) = r.target {
                        v["target_lt"] = json!(t);
                        v["target_met"] = json!(med < t);
                    }
                    if let Some(f) = r.reference {
                        for rf in &REFERENCES {
                            v[rf.key] = json!(f(rf));
                            v[format!("ratio_{}", rf.key)] = json!(round3(med / f(rf)));
                        }
                    }
                }
                o.insert(r.key.to_string(), v);
            }
            Value::Object(o)
        };
        let baseline = self.baseline.as_ref().map(|b| {
            let ratios: serde_json::Map<String, Value> = rows(&self.ours)
                .into_iter()
                .zip(rows(b))
                .map(|(o, r)| {
                    (
                        o.key.to_string(),
                        json!(round3(o.stats.median() / r.stats.median())),
                    )
                })
                .collect();
            json!({
                "tern": b.tern,
                "metrics": metrics(b, false),
                "ratio_ours_over_baseline": ratios,
            })
        });
        let linux = self.linux.as_ref().map(|l| {
            let st = |s: &Stats| {
                if s.samples.is_empty() {
                    Value::Null
                } else {
                    json!({
                        "median": round2(s.median()),
                        "min": round2(s.min()),
                        "max": round2(s.max()),
                        "samples": s.samples.iter().map(|x| round2(*x)).collect::<Vec<_>>(),
                    })
                }
            };
            json!({
                "kvm_pvm": l.pvm,
                "marker": l.marker,
                "cmdline": l.cmdline,
                "memory_mib": 512,
                "first_output_ms": st(&l.first_output_ms),
                "marker_ms": st(&l.marker_ms),
                "exit_ms": st(&l.exit_ms),
                "notes": l.notes,
            })
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "tool": "tern-bench boot",
            "timestamp_unix": now,
            "machine": self.machine.json(),
            "tern": self.ours.tern,
            "unikernel": self.unikernel,
            "runs": self.runs,
            "targets": {
                "first_output_ms_lt": TARGET_FIRST_MS,
                "exit_ms_lt": TARGET_EXIT_MS,
                "rss_outside_guest_mib_lt": TARGET_RSS_MIB,
            },
            "metrics": metrics(&self.ours, true),
            "baseline": baseline,
            "linux": linux,
        })
    }
}

//! `tern-bench hotplug`: how long a device hot plugged into a running VM
//! takes to serve the guest. One unikernel VM (`hotplug=1`) with a
//! virtio-scsi controller; per run: a virtio-blk disk plugged (API call ->
//! the guest's line after its first request on the disk completed), a
//! virtio-net NIC on a tap plugged (API call -> the guest's line after the
//! device took its first frame), a virtio-scsi LUN added (API call -> the
//! guest's line after its first command, an INQUIRY, on it), each
//! unplugged again. Times are host clock: the Instant before the request
//! is written, and when tern's console line arrives. See
//! tools/bench/README.md.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::http::{Conn, Request};
use crate::{report, Stats};

pub const USAGE: &str = "\
usage: tern-bench hotplug [--runs N] [--period MS] [--no-net] [--tern PATH]
                          [--unikernel PATH] [--json PATH]

Times hot plug on a running unikernel VM: PUT /drives/{id} (virtio-blk) ->
the guest's first completed request on the disk; PUT /network-interfaces/{id}
on a tap -> the device took the guest's first frame; PUT /drives/{id} with
interface virtio-scsi (a LUN) -> the guest's first command (INQUIRY) on
the LUN done; each DELETE -> gone from GET /devices (the LUN: the guest's
rescan without it). The guest polls the hot
plug registers and the scsi event queue at every heartbeat (--period), so
half a period is the mean polling delay in each figure.

  --runs N          plug/unplug cycles per device (default 10)
  --period MS       the guest's heartbeat period (default 2)
  --no-net          skip the NIC (it needs a tap: root, `ip tuntap`)
  --tern PATH       tern to measure (default: `tern` next to this program;
                    tern-blk, tern-net and tern-scsi must be next to it)
  --unikernel PATH  test unikernel ELF (default: built with make)
  --json PATH       also write every sample as JSON
";

struct Options {
    runs: usize,
    period: u32,
    net: bool,
    tern: PathBuf,
    unikernel: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn parse(it: impl Iterator<Item = OsString>) -> Result<Option<Options>, String> {
    let mut o = Options {
        runs: 10,
        period: 2,
        net: true,
        tern: crate::exe_dir()?.join("tern"),
        unikernel: None,
        json: None,
    };
    let mut args = crate::flags::Flags::new(it);
    while let Some((flag, inline, arg)) = args.next()? {
        let mut value = || args.value(&flag, &inline);
        let number = |v: String, what: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what}: '{v}' is not a positive number"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--runs" => o.runs = number(value()?, "--runs")? as usize,
            "--period" => {
                o.period = u32::try_from(number(value()?, "--period")?)
                    .map_err(|_| "--period: too large".to_string())?
            }
            "--no-net" => o.net = false,
            "--tern" => o.tern = PathBuf::from(value()?),
            "--unikernel" => o.unikernel = Some(PathBuf::from(value()?)),
            "--json" => o.json = Some(PathBuf::from(value()?)),
            _ => {
                return Err(format!(
                    "unknown option '{arg}' (see tern-bench hotplug --help)"
                ))
            }
        }
    }
    Ok(Some(o))
}

/// tern with its console lines arriving, timestamped, on a channel.
struct Tern {
    child: Child,
    lines: Receiver<(String, Instant)>,
}

impl Tern {
    fn spawn(tern: &Path, sock: &Path) -> Result<Tern, String> {
        let mut child = Command::new(tern)
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", tern.display()))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| "no stdout pipe".to_string())?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let at = Instant::now();
                // HEARTBEAT lines are most of the output and of no interest.
                if !line.starts_with("HEARTBEAT") && tx.send((line, at)).is_err() {
                    return;
                }
            }
        });
        Ok(Tern { child, lines: rx })
    }

    /// When the first line starting with `prefix` arrived (within `limit`).
    fn wait_line(&self, prefix: &str, limit: Duration) -> Result<(String, Instant), String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((l, at)) if l.starts_with(prefix) => return Ok((l, at)),
                Ok((l, _)) if l.starts_with("CHECK FAIL") => return Err(format!("guest: {l}")),
                Ok(_) => {}
                Err(_) => return Err(format!("no `{prefix}` line within {limit:?}")),
            }
        }
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("tern-{pid}")));
    }
}

/// A tap device for the NIC, removed when dropped.
struct Tap(String);

impl Tap {
    fn create(name: &str) -> Result<Tap, String> {
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let _ = ok(&["link", "del", name]);
        if !ok(&["tuntap", "add", "dev", name, "mode", "tap"]) || !ok(&["link", "set", name, "up"])
        {
            return Err(format!("cannot create tap {name} (needs root and `ip`)"));
        }
        Ok(Tap(name.to_string()))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

fn call(c: &mut Conn, method: &str, path: &str, body: Option<&Value>) -> Result<(), String> {
    let body = body.map(Value::to_string);
    c.call(&Request::new(method, path, body.as_deref(), 204))
        .map(|_| ())
}

fn device_present(c: &mut Conn, id: &str) -> Result<bool, String> {
    let r = c.call(&Request::new("GET", "/devices", None, 200))?;
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
    Ok(v.as_array()
        .is_some_and(|d| d.iter().any(|d| d["id"] == id)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Samples of one device kind: plug -> first request, unplug -> gone.
#[derive(Default)]
struct Samples {
    /// PUT -> its 204 (backend started and connected, device on the bus).
    answer: Vec<f64>,
    plug: Vec<f64>,
    unplug: Vec<f64>,
}

/// DELETE `path` and time it until `id` leaves GET /devices.
fn unplug(c: &mut Conn, path: &str, id: &str) -> Result<f64, String> {
    let t0 = Instant::now();
    call(c, "DELETE", path, None)?;
    while device_present(c, id)? {
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(format!("{id} still in GET /devices after 30 s"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(ms(t0.elapsed()))
}

pub fn main(it: impl Iterator<Item = OsString>) -> Result<(), String> {
    let Some(o) = parse(it)? else {
        print!("{USAGE}");
        return Ok(());
    };
    let tern = crate::check_binary("tern", &o.tern)?;
    let uk = match &o.unikernel {
        Some(p) => p.clone(),
        None => crate::build_unikernel()?,
    };
    let machine = report::Machine::probe();
    eprintln!("{}", machine.summary());
    let work = std::env::temp_dir().join(format!("tern-bench-hp-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let result = run(&o, &tern, &uk, &work, &machine);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run(
    o: &Options,
    tern: &Path,
    uk: &Path,
    work: &Path,
    machine: &report::Machine,
) -> Result<(), String> {
    let img = |name: &str| -> Result<PathBuf, String> {
        let p = work.join(name);
        let f = std::fs::File::create(&p).map_err(|e| e.to_string())?;
        f.set_len(8 << 20).map_err(|e| e.to_string())?;
        Ok(p)
    };
    let (blk, lun0, lun1) = (img("blk.raw")?, img("lun0.raw")?, img("lun1.raw")?);
    let tap = if o.net {
        match Tap::create("tbhp0") {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("NIC skipped: {e}");
                None
            }
        }
    } else {
        None
    };
    let sock = work.join("api.sock");
    let vm = Tern::spawn(tern, &sock)?;
    let mut c = {
        let start = Instant::now();
        loop {
            match Conn::connect(&sock) {
                Ok(c) => break c,
                Err(e) if start.elapsed() > Duration::from_secs(10) => {
                    return Err(format!("{}: {e}", sock.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    };
    c.set_timeout(Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    call(
        &mut c,
        "PUT",
        "/machine-config",
        Some(&json!({"vcpu_count": 1, "mem_size_mib": 64})),
    )?;
    let cmdline = format!("action=heartbeat period={} hotplug=1", o.period);
    call(
        &mut c,
        "PUT",
        "/boot-source",
        Some(&json!({"kernel_image_path": uk, "boot_args": cmdline})),
    )?;
    call(
        &mut c,
        "PUT",
        "/drives/s0",
        Some(&json!({"path_on_host": lun0, "interface": "virtio-scsi"})),
    )?;
    call(
        &mut c,
        "PUT",
        "/actions",
        Some(&json!({"action_type": "InstanceStart"})),
    )?;
    let limit = Duration::from_secs(60);
    vm.wait_line("scsi: report luns: 0", limit)?;

    let (mut b, mut n, mut l) = (Samples::default(), Samples::default(), Samples::default());
    // One cycle of each first, not counted: backend binaries and image
    // files come into the page cache.
    for i in 0..=o.runs {
        let keep = i > 0;
        let t0 = Instant::now();
        call(
            &mut c,
            "PUT",
            "/drives/hp",
            Some(&json!({"path_on_host": blk})),
        )?;
        let answered = ms(t0.elapsed());
        let (line, at) = vm.wait_line("HOTPLUG blk first-io ", limit)?;
        if !line.ends_with("status=0") {
            return Err(format!("guest: {line}"));
        }
        let plug = ms(at - t0);
        // The guest's pattern I/O on the disk, before the unplug.
        let (line, _) = vm.wait_line("HOTPLUG blk slot=", limit)?;
        if !line.ends_with("mismatches=0") {
            return Err(format!("guest: {line}"));
        }
        let gone = unplug(&mut c, "/drives/hp", "hp")?;
        if keep {
            b.answer.push(answered);
            b.plug.push(plug);
            b.unplug.push(gone);
        }

        if let Some(tap) = &tap {
            let t0 = Instant::now();
            call(
                &mut c,
                "PUT",
                "/network-interfaces/hpn",
                Some(&json!({"host_dev_name": tap.0})),
            )?;
            let answered = ms(t0.elapsed());
            let (line, at) = vm.wait_line("HOTPLUG net ", limit)?;
            if !line.ends_with("tx=ok") {
                return Err(format!("guest: {line}"));
            }
            let plug = ms(at - t0);
            let gone = unplug(&mut c, "/network-interfaces/hpn", "hpn")?;
            if keep {
                n.answer.push(answered);
                n.plug.push(plug);
                n.unplug.push(gone);
            }
        }

        let t0 = Instant::now();
        call(
            &mut c,
            "PUT",
            "/drives/s1",
            Some(&json!({"path_on_host": lun1, "interface": "virtio-scsi"})),
        )?;
        let answered = ms(t0.elapsed());
        let (line, at) = vm.wait_line("scsi: lun 1 first-io ", limit)?;
        if !line.ends_with(" ok") {
            return Err(format!("guest: {line}"));
        }
        let plug = ms(at - t0);
        // The guest's pattern I/O on the LUN, before the next step.
        let (line, _) = vm.wait_line("scsi: lun 1 write=", limit)?;
        if !line.ends_with("mismatches=0") || line.contains("failed") {
            return Err(format!("guest: {line}"));
        }
        let t1 = Instant::now();
        call(&mut c, "DELETE", "/drives/s1", None)?;
        let (line, at) = vm.wait_line("scsi: report luns: ", limit)?;
        if line != "scsi: report luns: 0" {
            return Err(format!("guest after the LUN's removal: {line}"));
        }
        if keep {
            l.answer.push(answered);
            l.plug.push(plug);
            l.unplug.push(ms(at - t1));
        }
        eprint!(".");
    }
    eprintln!();

    let row = |name: &str, what: &str, s: &[f64]| {
        let st = Stats::new(s.to_vec());
        println!(
            "{name:<12} {what:<44} {:>8.1} {:>8.1} {:>8.1}",
            st.median(),
            st.min(),
            st.max()
        );
    };
    println!(
        "tern-bench hotplug: {} runs each; ms median min max; guest heartbeat (poll) period {} ms",
        o.runs, o.period
    );
    row(
        "virtio-blk",
        "PUT -> 204 (backend up, device on the bus)",
        &b.answer,
    );
    row("virtio-blk", "PUT -> guest's first request done", &b.plug);
    row("virtio-blk", "DELETE -> gone from GET /devices", &b.unplug);
    if !n.plug.is_empty() {
        row(
            "virtio-net",
            "PUT -> 204 (backend up, device on the bus)",
            &n.answer,
        );
        row(
            "virtio-net",
            "PUT -> device took the guest's first frame",
            &n.plug,
        );
        row("virtio-net", "DELETE -> gone from GET /devices", &n.unplug);
    }
    row(
        "scsi LUN",
        "PUT -> 204 (tern-scsi opened it, event raised)",
        &l.answer,
    );
    row(
        "scsi LUN",
        "PUT -> guest's first command (INQUIRY) done",
        &l.plug,
    );
    row("scsi LUN", "DELETE -> guest's rescan without it", &l.unplug);
    if let Some(path) = &o.json {
        let v = json!({
            "machine": machine.json(),
            "runs": o.runs,
            "period_ms": o.period,
            "blk": {"answer_ms": b.answer, "plug_ms": b.plug, "unplug_ms": b.unplug},
            "net": {"answer_ms": n.answer, "plug_ms": n.plug, "unplug_ms": n.unplug},
            "scsi_lun": {"answer_ms": l.answer, "plug_ms": l.plug, "unplug_ms": l.unplug},
        });
        std::fs::write(path, v.to_string()).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

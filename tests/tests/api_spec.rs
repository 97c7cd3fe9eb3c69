//! `api-spec/tern.yaml` is the API's contract: its operations are exactly
//! the server's route table, its request schemas accept what the server's
//! parser accepts, and every answer of a real tern (before and after boot,
//! errors included) matches its response schemas.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use common::openapi::{
    checked_request, component_schema, spec, spec_operations, validate_against, validate_response,
    wait_for_socket,
};
use common::{require_kvm, tern_bin, UNIKERNEL};

#[test]
fn spec_operations_are_the_route_table() {
    let in_spec: BTreeSet<(String, String)> = spec_operations().into_iter().collect();
    let routed: BTreeSet<(String, String)> = tern::api::routes::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let fmt = |s: Vec<&(String, String)>| {
        s.iter()
            .map(|(m, p)| format!("{m} {p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let missing: Vec<_> = routed.difference(&in_spec).collect();
    let extra: Vec<_> = in_spec.difference(&routed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "api-spec/tern.yaml and tern::api::routes::ROUTES differ:\n  routed but not in the spec: [{}]\n  in the spec but not routed: [{}]",
        fmt(missing),
        fmt(extra)
    );
}

#[test]
fn spec_is_openapi_3_and_every_operation_documents_its_errors() {
    assert_eq!(spec()["openapi"], "3.0.3");
    for (method, path) in spec_operations() {
        let op = &spec()["paths"][&path][method.to_lowercase()];
        let responses = op["responses"].as_object().expect("responses");
        let success: Vec<_> = responses.keys().filter(|k| k.starts_with('2')).collect();
        assert_eq!(success.len(), 1, "{method} {path}: one success answer");
        for code in ["400", "413", "500"] {
            assert!(
                responses.contains_key(code),
                "{method} {path}: {code} undocumented"
            );
        }
        // Actions without parameters (a cancel) take no body either.
        let bodiless = method == "GET" || method == "DELETE" || path.ends_with("/cancel");
        assert_eq!(
            op.get("requestBody").is_some(),
            !bodiless,
            "{method} {path}: a body for every PUT and PATCH, none for GET, DELETE or a cancel"
        );
    }
}

#[test]
fn validator_accepts_conforming_answers() {
    let ok = |m: &str, p: &str, s: u16, b: &str| {
        validate_response(m, p, s, b).unwrap_or_else(|e| panic!("should be valid: {e}"))
    };
    ok(
        "GET",
        "/",
        200,
        r#"{"app_name":"tern","id":"tern-1","state":"Not started","vmm_version":"0.1.0"}"#,
    );
    ok("PUT", "/machine-config", 204, "");
    ok(
        "GET",
        "/machine-config",
        200,
        r#"{"vcpu_count":2,"mem_size_mib":64,"smt":false,"track_dirty_pages":false,"huge_pages":"None","cpu_template":"pvm"}"#,
    );
    ok(
        "GET",
        "/metrics",
        200,
        r#"{"boot_time_ms":null,"uptime_ms":3.5,"vcpu_exits":null,"api_requests":{"total":1,"ok":1,"client_errors":0,"server_errors":0}}"#,
    );
    ok(
        "GET",
        "/vm/config",
        200,
        r#"{"machine-config":{"vcpu_count":1,"mem_size_mib":128},"boot-source":{"kernel_image_path":"/k"},"serial":{"mode":"file","path":"/tmp/s"}}"#,
    );
    ok("GET", "/devices", 200, "[]");
    ok(
        "GET",
        "/devices",
        200,
        r#"[{"id":"lpc","kind":"isa-bridge","pci_address":"0000:00:1f.0","state":"attached"},{"id":"com1","kind":"serial","io_port":"0x3f8","state":"attached"}]"#,
    );
    ok("PUT", "/actions", 400, r#"{"fault_message":"no"}"#);
    ok(
        "GET",
        "/nope",
        404,
        r#"{"fault_message":"no such resource: /nope"}"#,
    );
    ok("DELETE", "/machine-config", 405, r#"{"fault_message":"x"}"#);
    ok(
        "GET",
        "/machine-config/?x=1",
        413,
        r#"{"fault_message":"x"}"#,
    );
}

#[test]
fn validator_refuses_nonconforming_answers() {
    let bad = |m: &str, p: &str, s: u16, b: &str, expect: &str| match validate_response(m, p, s, b)
    {
        Ok(()) => panic!("{m} {p} {s} {b} should not be valid"),
        Err(e) => assert!(e.contains(expect), "the error should say {expect:?}: {e}"),
    };
    let info = r#"{"app_name":"tern","id":"i","state":"Exploded","vmm_version":"0"}"#;
    bad("GET", "/", 200, info, "Exploded");
    bad(
        "GET",
        "/",
        200,
        r#"{"app_name":"tern","state":"Running","vmm_version":"0"}"#,
        "id",
    );
    bad(
        "GET",
        "/",
        200,
        r#"{"app_name":"tern","id":"i","state":"Running","vmm_version":"0","x":1}"#,
        "x",
    );
    bad("GET", "/", 204, "", "not documented");
    bad("PUT", "/machine-config", 200, "{}", "not documented");
    bad("PUT", "/machine-config", 204, "{}", "no body");
    bad("GET", "/", 200, "not json", "not JSON");
    bad(
        "GET",
        "/machine-config",
        200,
        r#"{"vcpu_count":0,"mem_size_mib":64}"#,
        "minimum",
    );
    bad(
        "GET",
        "/metrics",
        200,
        r#"{"boot_time_ms":null,"uptime_ms":null,"vcpu_exits":null,"api_requests":{"total":1,"ok":1,"client_errors":0,"server_errors":0}}"#,
        "uptime_ms",
    );
    bad(
        "GET",
        "/vm/config",
        200,
        r#"{"machine-config":{"vcpu_count":1,"mem_size_mib":128},"serial":{"mode":"file"}}"#,
        "serial",
    );
    bad(
        "GET",
        "/devices",
        200,
        r#"[{"id":"lpc","kind":"isa-bridge","pci_address":"00:1f.0","state":"attached"}]"#,
        "pci_address",
    );
    bad("PUT", "/actions", 400, "{}", "fault_message");
    bad("GET", "/nope", 404, r#"{"message":"x"}"#, "fault_message");
    bad("GET", "/nope", 405, r#"{"fault_message":"x"}"#, "only 404");
    bad(
        "GET",
        "/machine-config",
        405,
        r#"{"fault_message":"x"}"#,
        "not documented",
    );
}

/// Request bodies: the spec's schema and the server's parser agree on each.
#[test]
fn request_schemas_agree_with_the_server_parser() {
    let kernel = "/proc/self/exe";
    // (method, path, body); what the server accepts, the spec must accept,
    // and the other way round.
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 32}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 254, "mem_size_mib": 1048576, "smt": false,
                   "track_dirty_pages": true, "huge_pages": "2M", "cpu_template": "baseline"}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": null}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 0, "mem_size_mib": 64}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 255, "mem_size_mib": 64}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 31}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 1048577}),
        ),
        ("PUT", "/machine-config", json!({"vcpu_count": 1})),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 64, "ht": true}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1.5, "mem_size_mib": 64}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": "1", "mem_size_mib": 64}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "1G"}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "Host"}),
        ),
        ("PATCH", "/machine-config", json!({})),
        ("PATCH", "/machine-config", json!({"vcpu_count": 2})),
        (
            "PATCH",
            "/machine-config",
            json!({"vcpu_count": null, "huge_pages": null}),
        ),
        ("PATCH", "/machine-config", json!({"mem_size_mib": 8})),
        ("PATCH", "/machine-config", json!({"vcpu_count": 100000})),
        (
            "PATCH",
            "/machine-config",
            json!({"cpu_template": "pvm", "track_dirty_pages": false}),
        ),
        ("PATCH", "/machine-config", json!({"bogus": 1})),
        ("PUT", "/boot-source", json!({"kernel_image_path": kernel})),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": kernel, "initrd_path": kernel, "boot_args": "a=b"}),
        ),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": null}),
        ),
        ("PUT", "/boot-source", json!({"boot_args": "x"})),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": kernel, "cmdline": "x"}),
        ),
        ("PUT", "/boot-source", json!({"kernel_image_path": 7})),
        ("PUT", "/actions", json!({"action_type": "InstanceStart"})),
        ("PUT", "/actions", json!({"action_type": "SendCtrlAltDel"})),
        ("PUT", "/actions", json!({"action_type": "FlushMetrics"})),
        ("PUT", "/actions", json!({"action_type": "Reboot"})),
        (
            "PUT",
            "/actions",
            json!({"action_type": "InstanceStart", "x": 1}),
        ),
        ("PUT", "/actions", json!({})),
        ("PATCH", "/vm", json!({"state": "Paused"})),
        ("PATCH", "/vm", json!({"state": "Resumed"})),
        ("PATCH", "/vm", json!({"state": "Stopped"})),
        ("PATCH", "/vm", json!({"state": 1})),
        ("PUT", "/logger", json!({})),
        (
            "PUT",
            "/logger",
            json!({"level": "Off", "log_path": "/tmp/x"}),
        ),
        ("PUT", "/logger", json!({"level": null, "log_path": null})),
        ("PUT", "/logger", json!({"level": "Loud"})),
        ("PUT", "/logger", json!({"level": "off"})),
        ("PUT", "/logger", json!({"path": "/tmp/x"})),
    ];
    let mut disagreements = Vec::new();
    for (method, path, body) in &cases {
        let server = tern::api::routes::parse(method, path, body.to_string().as_bytes());
        let schema = &spec()["paths"][*path][method.to_lowercase()]["requestBody"]["content"]
            ["application/json"]["schema"];
        let in_spec = validate_against(schema, body);
        if server.is_ok() != in_spec.is_ok() {
            disagreements.push(format!(
                "{method} {path} {body}: server {}, spec {}",
                match &server {
                    Ok(_) => "accepts".to_string(),
                    Err(e) => format!("refuses ({e})"),
                },
                match &in_spec {
                    Ok(()) => "accepts".to_string(),
                    Err(e) => format!("refuses ({e})"),
                },
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "the spec's request schemas and the server disagree:\n{}",
        disagreements.join("\n")
    );
}

#[test]
fn component_schemas_exist() {
    for name in [
        "InstanceInfo",
        "MachineConfig",
        "MachineConfigUpdate",
        "BootSource",
        "InstanceActionInfo",
        "Vm",
        "VmConfig",
        "DeviceInfo",
        "Logger",
        "Metrics",
        "Error",
    ] {
        assert!(component_schema(name).is_object(), "{name}");
    }
}

/// A `tern --api-sock` process, killed on drop (it runs a guest that idles
/// forever).
struct Tern {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Tern {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("tern-api-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let sock = dir.join("api.sock");
        let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
        let child = Command::new(tern_bin())
            .arg("--api-sock")
            .arg(&sock)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn tern");
        let tern = Self { child, dir, sock };
        wait_for_socket(&tern.sock, Duration::from_secs(10));
        tern
    }

    /// A request whose answer must match the spec and have this status.
    fn expect(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> Value {
        let r = checked_request(&self.sock, method, path, body);
        assert_eq!(
            r.status,
            status,
            "{method} {path} {body:?}: {r:?}; tern's stderr: {}",
            self.stderr()
        );
        if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&r.body).expect("validated JSON")
        }
    }

    /// An error answer whose `fault_message` must mention `needle`.
    fn expect_error(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        status: u16,
        needle: &str,
    ) {
        let v = self.expect(method, path, body, status);
        let msg = v["fault_message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{method} {path}: the fault_message should mention {needle:?}: {msg:?}"
        );
    }

    fn state(&self) -> String {
        self.expect("GET", "/", None, 200)["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn live_answers_match_the_spec() {
    require_kvm();
    let t = Tern::start();

    // Before boot.
    assert_eq!(t.state(), "Not started");
    let config = t.expect("GET", "/vm/config", None, 200);
    assert!(config.get("boot-source").is_none(), "{config}");
    assert_eq!(t.expect("GET", "/devices", None, 200), json!([]));
    let metrics = t.expect("GET", "/metrics", None, 200);
    assert!(metrics["boot_time_ms"].is_null(), "{metrics}");
    t.expect(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":1,"mem_size_mib":64}"#),
        204,
    );
    t.expect("PATCH", "/machine-config", Some(r#"{"vcpu_count":2}"#), 204);
    let m = t.expect("GET", "/machine-config", None, 200);
    assert_eq!(
        (&m["vcpu_count"], &m["mem_size_mib"]),
        (&json!(2), &json!(64)),
        "{m}"
    );
    t.expect("PUT", "/logger", Some(r#"{"level":"Info"}"#), 204);
    t.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
        204,
    );

    // Refusals before boot.
    t.expect_error(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":"#),
        400,
        "machine-config",
    );
    t.expect_error(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":1,"mem_size_mib":64,"ht":true}"#),
        400,
        "`ht`",
    );
    t.expect_error(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":0,"mem_size_mib":64}"#),
        400,
        "vcpu_count 0",
    );
    t.expect_error(
        "PATCH",
        "/machine-config",
        Some(""),
        400,
        "needs a JSON body",
    );
    t.expect_error(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path":"/nonexistent/vmlinux"}"#),
        400,
        "kernel_image_path",
    );
    t.expect_error(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        400,
        "boot source",
    );
    t.expect_error(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
        400,
        "not started",
    );
    t.expect_error(
        "PATCH",
        "/vm",
        Some(r#"{"state":"Paused"}"#),
        400,
        "not started",
    );
    t.expect_error("GET", "/nope", None, 404, "/nope");
    t.expect_error("DELETE", "/machine-config", None, 405, "DELETE");
    t.expect_error("POST", "/", None, 405, "POST");
    let big = format!(r#"{{"kernel_image_path":"{}"}}"#, "a".repeat(100 << 10));
    t.expect_error("PUT", "/boot-source", Some(&big), 413, "too large");
    assert_eq!(t.state(), "Not started");

    // Boot.
    let boot = json!({"kernel_image_path": UNIKERNEL, "boot_args": "action=halt"}).to_string();
    t.expect("PUT", "/boot-source", Some(&boot), 204);
    let config = t.expect("GET", "/vm/config", None, 200);
    assert_eq!(
        config["boot-source"]["kernel_image_path"], UNIKERNEL,
        "{config}"
    );
    t.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        204,
    );
    assert_eq!(t.state(), "Running");

    // After boot.
    let config = t.expect("GET", "/vm/config", None, 200);
    assert_eq!(config["machine-config"]["vcpu_count"], 2, "{config}");
    let devices = t.expect("GET", "/devices", None, 200);
    assert!(
        devices
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["id"] == "com1")),
        "{devices}"
    );
    let metrics = t.expect("GET", "/metrics", None, 200);
    assert!(metrics["boot_time_ms"].is_number(), "{metrics}");
    assert!(metrics["vcpu_exits"].is_object(), "{metrics}");
    t.expect("PATCH", "/vm", Some(r#"{"state":"Paused"}"#), 204);
    assert_eq!(t.state(), "Paused");
    t.expect("PATCH", "/vm", Some(r#"{"state":"Paused"}"#), 204);
    t.expect("GET", "/metrics", None, 200);
    t.expect("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#), 204);
    assert_eq!(t.state(), "Running");
    t.expect("PUT", "/logger", Some(r#"{"level":"Warning"}"#), 204);
    t.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
        204,
    );

    // Refusals after boot.
    t.expect_error(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        400,
        "already started",
    );
    t.expect_error(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":1,"mem_size_mib":64}"#),
        400,
        "after the VM started",
    );
    t.expect_error(
        "PATCH",
        "/machine-config",
        Some(r#"{"vcpu_count":1}"#),
        400,
        "after the VM started",
    );
    t.expect_error(
        "PUT",
        "/boot-source",
        Some(&boot),
        400,
        "after the VM started",
    );
    t.expect_error(
        "PATCH",
        "/vm",
        Some(r#"{"state":"Stopped"}"#),
        400,
        "Stopped",
    );
    t.expect_error("GET", "/vm/config/x", None, 404, "/vm/config/x");
    t.expect_error("PUT", "/vm", Some("{}"), 405, "PUT");
    assert_eq!(t.state(), "Running");
}

//! `api-spec/tern.yaml` for the integration tests: a tiny HTTP client for
//! the API socket, and [`validate_response`], which checks an answer against
//! the spec (documented status, body matching that response's schema).
//!
//! OpenAPI 3.0 schemas are read as JSON Schema draft 4, with `nullable`
//! turned into a `"null"` type (the only OpenAPI-only keyword the spec uses
//! that changes validation).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// The spec file.
pub fn spec_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../api-spec/tern.yaml")
}

/// The spec as parsed from YAML (OpenAPI keywords intact), parsed once.
pub fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = spec_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_yaml_ng::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid YAML for JSON: {e}", path.display()))
    })
}

/// The spec's `components`, with OpenAPI schemas turned into JSON Schema.
fn json_schema_components() -> &'static Value {
    static COMPONENTS: OnceLock<Value> = OnceLock::new();
    COMPONENTS.get_or_init(|| {
        let mut c = spec().get("components").cloned().unwrap_or(json!({}));
        to_json_schema(&mut c);
        c
    })
}

/// Every `(METHOD, path)` the spec documents, methods in upper case.
pub fn spec_operations() -> Vec<(String, String)> {
    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let mut ops = Vec::new();
    if let Some(paths) = spec().get("paths").and_then(Value::as_object) {
        for (path, item) in paths {
            for m in METHODS {
                if item.get(*m).is_some() {
                    ops.push((m.to_uppercase(), path.clone()));
                }
            }
        }
    }
    ops.sort();
    ops
}

/// Rewrites OpenAPI 3.0 `nullable: true` as JSON Schema: `null` added to
/// `type` (and to `enum` when there is one).
fn to_json_schema(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.remove("nullable") == Some(Value::Bool(true)) {
                if let Some(Value::String(t)) = o.get("type").cloned() {
                    o.insert("type".into(), json!([t, "null"]));
                }
                if let Some(Value::Array(e)) = o.get_mut("enum") {
                    if !e.contains(&Value::Null) {
                        e.push(Value::Null);
                    }
                }
            }
            o.values_mut().for_each(to_json_schema);
        }
        Value::Array(a) => a.iter_mut().for_each(to_json_schema),
        _ => {}
    }
}

/// Follows a local `$ref` (`#/components/...`) in the spec.
fn deref(v: &'static Value) -> Result<&'static Value, String> {
    match v.get("$ref").and_then(Value::as_str) {
        None => Ok(v),
        Some(r) => {
            let pointer = r
                .strip_prefix('#')
                .ok_or_else(|| format!("non-local $ref {r} in the spec"))?;
            spec()
                .pointer(pointer)
                .ok_or_else(|| format!("dangling $ref {r} in the spec"))
        }
    }
}

/// The path as the server routes it: no query string, no trailing slash.
fn normalise(path: &str) -> &str {
    let p = path.split(['?', '#']).next().unwrap_or("");
    match p.strip_suffix('/') {
        Some(s) if !s.is_empty() => s,
        _ => p,
    }
}

/// Whether `path` is an instance of the spec's path `template`
/// (`/drives/{drive_id}` matches `/drives/d0`).
fn template_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && t.ends_with('}') && !p.is_empty()) || t == p)
}

/// The response object the spec documents for this request and status.
fn documented_response(method: &str, path: &str, status: u16) -> Result<&'static Value, String> {
    let path = normalise(path);
    let responses = spec().pointer("/components/responses");
    let component = |name: &str| {
        responses
            .and_then(|r| r.get(name))
            .ok_or_else(|| format!("the spec has no components/responses/{name}"))
    };
    let item = spec()
        .get("paths")
        .and_then(Value::as_object)
        .and_then(|paths| {
            paths.get(path).or_else(|| {
                paths
                    .iter()
                    .find(|(t, _)| template_matches(t, path))
                    .map(|(_, v)| v)
            })
        });
    let Some(item) = item else {
        return match status {
            404 => component("NotFound"),
            _ => Err(format!(
                "{method} {path}: the path is not in the spec, so only 404 is documented, not {status}"
            )),
        };
    };
    let Some(op) = item.get(method.to_lowercase()) else {
        return match status {
            405 => component("MethodNotAllowed"),
            _ => Err(format!(
                "{method} {path}: the method is not in the spec for this path, so only 405 is documented, not {status}"
            )),
        };
    };
    let responses = op
        .get("responses")
        .and_then(Value::as_object)
        .ok_or_else(|| format!("{method} {path}: no responses in the spec"))?;
    let response = responses
        .get(&status.to_string())
        .or_else(|| responses.get("default"))
        .ok_or_else(|| {
            let documented: Vec<&str> = responses.keys().map(String::as_str).collect();
            format!(
                "{method} {path}: status {status} is not documented (documented: {})",
                documented.join(", ")
            )
        })?;
    deref(response)
}

/// Checks an answer against the spec: `status` is documented for the
/// operation (404 and 405 via `components/responses` for paths and methods
/// the spec lacks), and `body` is empty when the response has no content, or
/// JSON valid against the response's `application/json` schema.
pub fn validate_response(method: &str, path: &str, status: u16, body: &str) -> Result<(), String> {
    let response = documented_response(method, path, status)?;
    let what = format!("{method} {path} -> {status}");
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        return if body.is_empty() {
            Ok(())
        } else {
            Err(format!("{what}: the spec documents no body, got {body:?}"))
        };
    };
    let Some(schema) = content
        .get("application/json")
        .and_then(|c| c.get("schema"))
    else {
        let types: Vec<&str> = content.keys().map(String::as_str).collect();
        return Err(format!(
            "{what}: the spec documents only {types:?}, not application/json"
        ));
    };
    let instance: Value = serde_json::from_str(body)
        .map_err(|e| format!("{what}: the body is not JSON ({e}): {body:?}"))?;
    validate_against(schema, &instance).map_err(|e| format!("{what}: {e}; body: {body}"))
}

/// Validates `instance` against `schema`, an OpenAPI schema from the spec
/// whose `$ref`s point into the spec's `#/components`.
pub fn validate_against(schema: &Value, instance: &Value) -> Result<(), String> {
    let mut schema = schema.clone();
    to_json_schema(&mut schema);
    // The schema at the root of a document that also holds the components,
    // so `#/components/schemas/...` resolves.
    let mut root = Map::new();
    root.insert("allOf".into(), json!([schema]));
    root.insert("components".into(), json_schema_components().clone());
    let validator = jsonschema::draft4::new(&Value::Object(root))
        .map_err(|e| format!("the spec's schema does not compile: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("at '{}': {e}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("does not match the spec: {}", errors.join("; ")))
    }
}

/// The named schema of `#/components/schemas`.
pub fn component_schema(name: &str) -> &'static Value {
    spec()
        .pointer(&format!("/components/schemas/{name}"))
        .unwrap_or_else(|| panic!("no components/schemas/{name} in the spec"))
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request on a new connection to the API socket `sock` and reads
/// the answer; panics when there is none (the API must always answer).
pub fn send(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Response {
    let what = format!("{method} {path}");
    let mut stream = UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("{what}: connect {}: {e}", sock.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set_read_timeout");
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body.as_bytes());
    // The server may answer (413) and close before reading a large body:
    // a failed write is fine as long as an answer comes.
    let _ = stream.write_all(&request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        // A reset after the answer arrived is fine too.
        if raw.is_empty() {
            panic!("{what}: no answer: {e}");
        }
    }
    parse_response(&raw).unwrap_or_else(|e| {
        panic!(
            "{what}: {e}; raw answer: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head_len = match r.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("incomplete HTTP answer".into()),
        Err(e) => return Err(format!("bad HTTP answer: {e}")),
    };
    let status = r.code.ok_or("no status code")?;
    let headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut body = &raw[head_len..];
    if let Some((_, len)) = headers.iter().find(|(n, _)| n == "content-length") {
        let len: usize = len
            .trim()
            .parse()
            .map_err(|_| format!("bad Content-Length {len:?}"))?;
        if body.len() < len {
            return Err(format!(
                "body of {} bytes, Content-Length {len}",
                body.len()
            ));
        }
        body = &body[..len];
    }
    let body = String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_string())?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// [`send`], returning the status and the body.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let r = send(sock, method, path, body);
    (r.status, r.body)
}

/// [`send`], panicking unless the answer matches the spec: documented
/// status and schema, `Content-Type: application/json` on every body, and
/// `Allow` on a 405.
pub fn checked_request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Response {
    let r = send(sock, method, path, body);
    if let Err(e) = validate_response(method, path, r.status, &r.body) {
        panic!("the answer does not match api-spec/tern.yaml: {e}");
    }
    if !r.body.is_empty() {
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{method} {path}: Content-Type of a JSON answer: {r:?}"
        );
    }
    if r.status == 405 {
        assert!(
            r.header("allow").is_some(),
            "{method} {path}: 405 without Allow: {r:?}"
        );
    }
    r
}

/// Waits until something accepts connections on `sock`.
pub fn wait_for_socket(sock: &Path, timeout: Duration) {
    let start = Instant::now();
    while UnixStream::connect(sock).is_err() {
        assert!(
            start.elapsed() < timeout,
            "nothing listens on {} after {timeout:?}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

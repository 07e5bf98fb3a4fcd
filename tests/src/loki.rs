//! A Grafana Loki push receiver, faithful to what Loki's distributor does
//! with `POST /loki/api/v1/push` (`pkg/loghttp/push/push.go`) and what the
//! reverse proxy in front of it does with basic auth:
//!
//! * only `POST` on the push path (405 for other methods, 404 elsewhere);
//! * basic auth when set (401 with `WWW-Authenticate`, as nginx answers);
//! * `X-Scope-OrgID` required when multi-tenant (401 "no org id");
//! * `Content-Encoding` empty, `gzip` or `deflate`, anything else 400;
//! * `Content-Type: application/json`: the v1 JSON body, streams with at
//!   least one valid label, values of `[ "<ns>", "<line>" ]` (a third
//!   element, structured metadata, allowed);
//! * any other type (or none): a snappy-compressed (raw block) protobuf
//!   `PushRequest` (`pkg/push/push.proto`), its labels a selector
//!   `{name="value", …}`;
//! * anything else 400;
//! * 204 on success;
//! * entries kept once per (tenant, labels, timestamp, line): Loki's head
//!   block and its queriers de-duplicate exactly these.
//!
//! Faults to inject: fail the next pushes with a status, reject pushes
//! holding a marker (400), and hold a push unanswered (after keeping it).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub tenant: String,
    /// The stream's labels, sorted, `k=v` joined by commas.
    pub labels: String,
    pub ts: i64,
    pub line: String,
}

/// What one push carried, as the receiver saw it.
#[derive(Debug, Clone, Default)]
pub struct PushSeen {
    pub authorization: Option<String>,
    pub tenant: Option<String>,
    pub content_encoding: Option<String>,
    pub content_type: String,
    pub entries: usize,
}

#[derive(Default)]
struct State {
    kept: BTreeSet<Entry>,
    /// Entries received, repeats included.
    received: usize,
    pushes: Vec<PushSeen>,
    fail_next: Vec<u16>,
    reject_marker: Option<String>,
    hold_after: Option<usize>,
    held: usize,
    /// Pushes refused for their credentials.
    unauthorized: usize,
    /// The proxy's `user:password`, changed by [`LokiReceiver::set_basic_auth`].
    basic_auth: Option<(String, String)>,
}

/// Settings of the receiver.
#[derive(Clone, Default)]
pub struct LokiConfig {
    /// `user:password` the proxy requires at first.
    pub basic_auth: Option<(String, String)>,
    /// Multi-tenant (`auth_enabled: true`): `X-Scope-OrgID` required.
    pub multi_tenant: bool,
    /// The push path (a proxy's prefix before Loki's).
    pub path: Option<String>,
    /// https.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

#[derive(Clone)]
pub struct LokiReceiver {
    pub port: u16,
    state: Arc<Mutex<State>>,
    release: Arc<tokio::sync::Notify>,
}

const PUSH_PATH: &str = "/loki/api/v1/push";

impl LokiReceiver {
    pub async fn start(config: LokiConfig) -> LokiReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let r = LokiReceiver {
            port,
            state: Arc::new(Mutex::new(State {
                basic_auth: config.basic_auth.clone(),
                ..State::default()
            })),
            release: Arc::default(),
        };
        let served = r.clone();
        let config = Arc::new(config);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (r, config) = (served.clone(), config.clone());
                tokio::spawn(async move {
                    let tls = config.tls.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let (r, config) = (r.clone(), config.clone());
                        async move { Ok::<_, std::convert::Infallible>(r.serve(&config, req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        r
    }

    /// The next pushes answer these statuses, in order.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.state
            .lock()
            .unwrap()
            .fail_next
            .extend_from_slice(statuses);
    }

    /// The proxy now takes these credentials (its owner fixed them).
    pub fn set_basic_auth(&self, user: &str, password: &str) {
        self.state.lock().unwrap().basic_auth = Some((user.into(), password.into()));
    }

    /// Pushes refused so far for their credentials.
    pub fn unauthorized(&self) -> usize {
        self.state.lock().unwrap().unauthorized
    }

    /// Pushes holding a line with `marker` are refused with 400.
    pub fn reject_lines_with(&self, marker: &str) {
        self.state.lock().unwrap().reject_marker = Some(marker.to_owned());
    }

    /// After `n` more pushes, the next one is kept but not answered until
    /// [`LokiReceiver::release`].
    pub fn hold_after(&self, n: usize) {
        let mut s = self.state.lock().unwrap();
        s.hold_after = Some(s.pushes.len() + n);
    }

    /// How many pushes are kept and held unanswered.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap().held
    }

    pub fn release(&self) {
        self.state.lock().unwrap().hold_after = None;
        self.release.notify_waiters();
    }

    /// The entries kept, in timestamp order (as a query returns them).
    pub fn entries(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = self.state.lock().unwrap().kept.iter().cloned().collect();
        v.sort_by_key(|e| e.ts);
        v
    }

    /// Entries received, repeats included.
    pub fn received(&self) -> usize {
        self.state.lock().unwrap().received
    }

    pub fn pushes(&self) -> Vec<PushSeen> {
        self.state.lock().unwrap().pushes.clone()
    }

    async fn serve(
        &self,
        config: &LokiConfig,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Full<Bytes>> {
        let answer = |status: u16, text: &str| {
            Response::builder()
                .status(status)
                .body(Full::new(Bytes::from(format!("{text}\n"))))
                .unwrap()
        };
        let path = config.path.as_deref().unwrap_or(PUSH_PATH);
        if req.uri().path() != path {
            return answer(404, "404 page not found");
        }
        if req.method() != hyper::Method::POST {
            return answer(405, "Method Not Allowed");
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let authorization = header("authorization");
        let basic_auth = self.state.lock().unwrap().basic_auth.clone();
        if let Some((user, pass)) = &basic_auth {
            use base64::Engine;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            );
            if authorization.as_deref() != Some(want.as_str()) {
                self.state.lock().unwrap().unauthorized += 1;
                let mut r = answer(401, "401 Authorization Required");
                r.headers_mut()
                    .insert("www-authenticate", "Basic realm=\"loki\"".parse().unwrap());
                return r;
            }
        }
        let tenant = header("x-scope-orgid");
        if config.multi_tenant && tenant.as_deref().is_none_or(str::is_empty) {
            return answer(401, "no org id");
        }
        let encoding = header("content-encoding");
        let content_type = header("content-type").unwrap_or_default();
        let raw = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return answer(400, &e.to_string()),
        };
        let mut body = Vec::new();
        let decoded = match encoding.as_deref().unwrap_or("") {
            // "snappy" is passed on: the protobuf path decodes it.
            "" | "snappy" => {
                body = raw.to_vec();
                Ok(0)
            }
            "gzip" => flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut body),
            "deflate" => flate2::read::DeflateDecoder::new(&raw[..]).read_to_end(&mut body),
            other => return answer(400, &format!("Content-Encoding {other:?} not supported")),
        };
        if let Err(e) = decoded {
            return answer(400, &e.to_string());
        }
        let tenant_or_fake = tenant.clone().unwrap_or_else(|| "fake".into());
        let json = content_type.split(';').next().map(str::trim) == Some("application/json");
        let parsed = match json {
            true => parse(&body, tenant_or_fake),
            false => parse_proto(&body, tenant_or_fake),
        };
        let entries = match parsed {
            Ok(e) => e,
            Err(why) => return answer(400, &why),
        };
        let hold = {
            let mut s = self.state.lock().unwrap();
            s.pushes.push(PushSeen {
                authorization,
                tenant,
                content_encoding: encoding,
                content_type,
                entries: entries.len(),
            });
            if let Some(status) = (!s.fail_next.is_empty()).then(|| s.fail_next.remove(0)) {
                return answer(status, "injected failure");
            }
            if let Some(m) = &s.reject_marker {
                if let Some(e) = entries.iter().find(|e| e.line.contains(m.as_str())) {
                    return answer(
                        400,
                        &format!(
                            "entry for stream '{{{}}}' has timestamp too old: {}",
                            e.labels, e.ts
                        ),
                    );
                }
            }
            s.received += entries.len();
            s.kept.extend(entries);
            let hold = s.hold_after.is_some_and(|n| s.pushes.len() > n);
            if hold {
                s.held += 1;
            }
            hold
        };
        if hold {
            self.release.notified().await;
        }
        Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }
}

fn valid_label(name: &str) -> bool {
    let mut c = name.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

// Loki's messages, from `pkg/push/push.proto`.
#[derive(Clone, PartialEq, prost::Message)]
struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    streams: Vec<StreamAdapter>,
    #[prost(string, tag = "2")]
    format: String,
}
#[derive(Clone, PartialEq, prost::Message)]
struct StreamAdapter {
    #[prost(string, tag = "1")]
    labels: String,
    #[prost(message, repeated, tag = "2")]
    entries: Vec<EntryAdapter>,
    #[prost(uint64, tag = "3")]
    hash: u64,
}
#[derive(Clone, PartialEq, prost::Message)]
struct LabelPairAdapter {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}
#[derive(Clone, PartialEq, prost::Message)]
struct EntryAdapter {
    #[prost(message, optional, tag = "1")]
    timestamp: Option<Timestamp>,
    #[prost(string, tag = "2")]
    line: String,
    #[prost(message, repeated, tag = "3")]
    structured_metadata: Vec<LabelPairAdapter>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Timestamp {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// A stream selector as Loki's `syntax.ParseLabels` reads it:
/// `{name="value", …}`, values with Go's escapes.
fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let bad = || format!("couldn't parse labels: {s:?}");
    let inner = s
        .trim()
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .ok_or_else(bad)?;
    let mut out = BTreeMap::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let name: String =
            std::iter::from_fn(|| chars.next_if(|c| c.is_alphanumeric() || *c == '_')).collect();
        if !valid_label(&name) || chars.next() != Some('=') || chars.next() != Some('"') {
            return Err(bad());
        }
        let mut value = String::new();
        loop {
            match chars.next().ok_or_else(bad)? {
                '"' => break,
                '\\' => value.push(match chars.next().ok_or_else(bad)? {
                    'n' => '\n',
                    't' => '\t',
                    c @ ('\\' | '"') => c,
                    _ => return Err(bad()),
                }),
                c => value.push(c),
            }
        }
        out.insert(name, value);
    }
}

/// Loki's default push body: raw-snappy protobuf.
fn parse_proto(body: &[u8], tenant: String) -> Result<Vec<Entry>, String> {
    use prost::Message;
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("snappy: {e}"))?;
    let push = PushRequest::decode(&raw[..]).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for s in push.streams {
        let labels = parse_labels(&s.labels)?;
        if labels.is_empty() {
            return Err("error at least one label pair is required per stream".into());
        }
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        for e in s.entries {
            let t = e.timestamp.unwrap_or_default();
            out.push(Entry {
                tenant: tenant.clone(),
                labels: labels.clone(),
                ts: t.seconds * 1_000_000_000 + i64::from(t.nanos),
                line: e.line,
            });
        }
    }
    Ok(out)
}

/// Loki's v1 JSON push body.
fn parse(body: &[u8], tenant: String) -> Result<Vec<Entry>, String> {
    #[derive(serde::Deserialize)]
    struct Push {
        streams: Vec<Stream>,
    }
    #[derive(serde::Deserialize)]
    struct Stream {
        stream: BTreeMap<String, String>,
        values: Vec<Vec<serde_json::Value>>,
    }
    let push: Push = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for s in push.streams {
        if s.stream.is_empty() {
            return Err("error at least one label pair is required per stream".into());
        }
        if let Some(bad) = s.stream.keys().find(|k| !valid_label(k)) {
            return Err(format!("invalid label name {bad:?}"));
        }
        let labels = s
            .stream
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        for v in s.values {
            let (ts, line) = match v.as_slice() {
                [serde_json::Value::String(ts), serde_json::Value::String(line)]
                | [serde_json::Value::String(ts), serde_json::Value::String(line), serde_json::Value::Object(_)] => {
                    (ts, line)
                }
                _ => return Err(format!("invalid entry {v:?}")),
            };
            let ts: i64 = ts
                .parse()
                .map_err(|_| format!("invalid timestamp {ts:?}"))?;
            out.push(Entry {
                tenant: tenant.clone(),
                labels: labels.clone(),
                ts,
                line: line.clone(),
            });
        }
    }
    Ok(out)
}

//! Harness for the black-box tests: starts the real `embedd` binary on a free port and talks HTTP.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub use reqwest::blocking::Client;
pub use serde_json::{json, Value};

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The binary under test: `$EMBEDD_BIN`, else the workspace's debug build.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("EMBEDD_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let bin = target.join("debug/embedd");
    assert!(
        bin.is_file(),
        "{} not found: build it first (cargo build --bins) or set EMBEDD_BIN",
        bin.display()
    );
    bin
}

pub fn weights_dir() -> PathBuf {
    std::env::var_os("EMBEDD_WEIGHTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("models/weights"))
}

pub const MODEL: &str = "all-MiniLM-L6-v2";

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    pub client: Client,
    data_dir: PathBuf,
    /// The data dir belongs to the test (kept across restarts), not to this server.
    keep_data: bool,
}

impl Server {
    /// Starts with the default model plus `args`.
    pub fn start(args: &[&str]) -> Self {
        Self::try_start(args).unwrap_or_else(|log| panic!("server did not start:\n{log}"))
    }

    /// Starts the server; `Err` carries its output when it exits before listening.
    pub fn try_start(args: &[&str]) -> Result<Self, String> {
        Self::launch(&temp_dir("embedd-test"), false, args)
    }

    /// Starts on a data dir the test owns, so a later server can pick up its jobs.
    pub fn start_with_data(data_dir: &std::path::Path, args: &[&str]) -> Self {
        Self::launch(data_dir, true, args)
            .unwrap_or_else(|log| panic!("server did not start:\n{log}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit (after a signal the test sent) and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn launch(data_dir: &std::path::Path, keep_data: bool, args: &[&str]) -> Result<Self, String> {
        let data_dir = data_dir.to_path_buf();
        let mut child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", "0"])
            .arg("--weights-dir")
            .arg(weights_dir())
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("EMBEDD_MODELS")
            .env_remove("EMBEDD_API_KEYS")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning embedd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("embedd listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(base) => Ok(Self {
                child,
                base,
                client: Client::builder()
                    .timeout(Duration::from_secs(300))
                    .build()
                    .expect("http client"),
                data_dir,
                keep_data,
            }),
            Err(_) => {
                let _ = child.kill();
                let mut log = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut log);
                }
                let status = child.wait().ok();
                Err(format!("exit status {status:?}\n{log}"))
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs JSON; returns status and parsed body.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .expect("request");
        read(resp)
    }

    pub fn post_raw(&self, path: &str, body: impl Into<reqwest::blocking::Body>) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("request");
        read(resp)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        read(self.client.get(self.url(path)).send().expect("request"))
    }

    /// The `/v1/models` card of model `id`; panics when it is not listed.
    pub fn model_card(&self, id: &str) -> Value {
        let (_, models) = self.get("/v1/models");
        models["data"]
            .as_array()
            .and_then(|cards| cards.iter().find(|c| c["id"] == id))
            .unwrap_or_else(|| panic!("{id} is not in /v1/models: {models}"))
            .clone()
    }

    /// Embeds with `extra` fields merged into `{"model", "input"}`; panics unless 200.
    pub fn embed(&self, input: Value, extra: Value) -> Value {
        let mut body = json!({"model": MODEL, "input": input});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let (status, resp) = self.post("/v1/embeddings", &body);
        assert_eq!(status, 200, "{resp}");
        resp
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep_data {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

fn read(resp: reqwest::blocking::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().expect("body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// A fresh directory path under the system temp dir.
pub fn temp_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), unique()))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The float vectors of an embeddings response, in `data` order.
pub fn vectors(resp: &Value) -> Vec<Vec<f32>> {
    resp["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| floats(&d["embedding"]))
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// The first 422 entry's `loc`, `type`, and `msg`.
pub fn first_error(body: &Value) -> (Value, String, String) {
    let e = &body["detail"][0];
    (
        e["loc"].clone(),
        e["type"].as_str().unwrap_or_default().to_string(),
        e["msg"].as_str().unwrap_or_default().to_string(),
    )
}

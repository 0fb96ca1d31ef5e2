//! Command line and environment: every flag has an `EMBEDD_*` variable.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;
use embedd_runtime::{DeviceSpec, Precision};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "embedd",
    version,
    about = "Self-hosted inference server speaking the Jina AI Search Foundation API"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "EMBEDD_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free one and logs it).
    #[arg(long, short, env = "EMBEDD_PORT", default_value_t = 8080)]
    pub port: u16,

    /// A model to serve: `NAME` (from the catalog) or `NAME=SOURCE`, SOURCE a local directory or a
    /// Hugging Face repository id (`org/name[@revision]`). Repeat, or separate with commas.
    #[arg(
        long = "model",
        short,
        env = "EMBEDD_MODELS",
        value_delimiter = ',',
        default_value = "all-MiniLM-L6-v2"
    )]
    pub models: Vec<String>,

    /// A TOML file of extra catalog entries (same shape as models/catalog.toml).
    #[arg(long, env = "EMBEDD_MODELS_FILE")]
    pub models_file: Option<PathBuf>,

    /// Where catalog models' local weights live (filled by models/fetch-weights).
    #[arg(long, env = "EMBEDD_WEIGHTS_DIR", default_value = "models/weights")]
    pub weights_dir: PathBuf,

    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, env = "EMBEDD_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,

    /// Number format: f32 (exact); bf16 (on the CPU: dense layers and attention products in
    /// bfloat16 on CPUs with AVX-512 BF16, about twice the throughput, cosine >= 0.999 to f32;
    /// on a GPU: weights stored in bfloat16); f16 (GPUs); int8 (CPUs with AVX-512 VNNI: dense
    /// layers on 8-bit weights and inputs; experimental: cosine about 0.99 to f32, below bf16's
    /// 0.999).
    #[arg(long, env = "EMBEDD_DTYPE", default_value = "f32")]
    pub dtype: Precision,

    /// Directory for server state (bulk jobs and their files).
    #[arg(long, env = "EMBEDD_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// API keys accepted as `Authorization: Bearer KEY`. Without any, the server is open.
    #[arg(
        long = "api-key",
        env = "EMBEDD_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Origins a browser app may call the API from (repeat or comma-separate; `*` for any);
    /// preflight requests are answered on every route. Default: none (same-origin only).
    #[arg(
        long = "cors-allow-origin",
        env = "EMBEDD_CORS_ALLOW_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_allow_origins: Vec<String>,

    /// Largest request body accepted, in bytes (larger: 413).
    #[arg(long, env = "EMBEDD_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most inputs one request may carry (more: 422). The server splits them into batches itself.
    #[arg(long, env = "EMBEDD_MAX_CLIENT_BATCH_SIZE", default_value_t = 2048)]
    pub max_client_batch_size: usize,

    /// Tokens one request's inputs may come to after tokenization (more: 422): bounds one
    /// request's model time whatever its mix of count and length.
    #[arg(long, env = "EMBEDD_MAX_REQUEST_TOKENS", default_value_t = 1 << 20)]
    pub max_request_tokens: usize,

    /// Most documents one rerank request may carry (more: 422).
    #[arg(long, env = "EMBEDD_MAX_RERANK_DOCUMENTS", default_value_t = 4096)]
    pub max_rerank_documents: usize,

    /// Token budget of one model batch (batch size x longest input); default 16384 on the CPU,
    /// 131072 on a GPU, whose throughput keeps growing with the batch long after a CPU's stops.
    #[arg(long, env = "EMBEDD_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,

    /// Most inputs in one model batch; default 64 on the CPU, 512 on a GPU.
    #[arg(long, env = "EMBEDD_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,

    /// Most inputs in one background (bulk) batch; a live request waits behind at most one.
    #[arg(long, env = "EMBEDD_MAX_BACKGROUND_BATCH_SIZE", default_value_t = 8)]
    pub max_background_batch_size: usize,

    /// Inputs waiting per model before new requests get 429.
    #[arg(long, env = "EMBEDD_MAX_QUEUED_INPUTS", default_value_t = 65_536)]
    pub max_queued_inputs: usize,

    /// A request whose expected wait in its model's queue (from the measured throughput, the
    /// queue shared round-robin) is longer gets 429 with Retry-After; 0: no limit.
    #[arg(long, env = "EMBEDD_MAX_QUEUE_WAIT_SECS", default_value_t = 10.0)]
    pub max_queue_wait_secs: f64,

    /// Requests handled at once across the API routes; more get 429 at once.
    #[arg(long, env = "EMBEDD_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,

    /// Largest image an `{url}` input may fetch, in bytes.
    #[arg(long, env = "EMBEDD_MAX_IMAGE_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_image_bytes: usize,

    /// Most pixels (width x height) an image may have; checked from its header, before decoding.
    #[arg(long, env = "EMBEDD_MAX_IMAGE_PIXELS", default_value_t = 50_000_000)]
    pub max_image_pixels: u64,

    /// How long fetching one image URL may take, redirects included, in seconds.
    #[arg(long, env = "EMBEDD_IMAGE_FETCH_TIMEOUT_SECS", default_value_t = 10)]
    pub image_fetch_timeout_secs: u64,

    /// Fetch image URLs that resolve to loopback, private, link-local, CGNAT, multicast or
    /// metadata addresses (refused by default: server-side request forgery).
    #[arg(long, env = "EMBEDD_ALLOW_PRIVATE_IMAGE_URLS")]
    pub allow_private_image_urls: bool,

    /// Cut over-long inputs to the model's length when a request leaves out `truncate` (clients
    /// such as LangChain, LlamaIndex and Haystack cannot send it); `truncate: false` still
    /// refuses them.
    #[arg(long, env = "EMBEDD_AUTO_TRUNCATE")]
    pub auto_truncate: bool,

    /// Largest bulk-embeddings upload, in bytes (larger: 413).
    #[arg(long, env = "EMBEDD_MAX_UPLOAD_BYTES", default_value_t = 100 * 1024 * 1024)]
    pub max_upload_bytes: usize,

    /// Where bulk jobs' state lives: a PostgreSQL address (postgres://USER:PASS@HOST/DB) that
    /// replicas share; default: SQLite under the data dir, for one process.
    #[arg(long, env = "EMBEDD_BULK_STORE")]
    pub bulk_store: Option<String>,

    /// Where bulk jobs' uploads and results live: an S3 bucket (s3://BUCKET/PREFIX, with the
    /// standard AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) that
    /// replicas share; default: files under the data dir.
    #[arg(long, env = "EMBEDD_BULK_OBJECTS")]
    pub bulk_objects: Option<String>,

    /// Rows a bulk job embeds and commits at a time (fixed per job when it is uploaded).
    #[arg(long, env = "EMBEDD_BULK_CHUNK_ROWS", default_value_t = 256)]
    pub bulk_chunk_rows: usize,

    /// How long a replica holds a bulk chunk without renewing its lease; a replica that dies
    /// mid-chunk has it redone by another this long after its last renewal.
    #[arg(long, env = "EMBEDD_BULK_LEASE_SECS", default_value_t = 60.0)]
    pub bulk_lease_secs: f64,

    /// Bulk chunks this replica embeds at once (keys take turns chunk by chunk).
    #[arg(long, env = "EMBEDD_BULK_WORKERS", default_value_t = 1)]
    pub bulk_workers: usize,

    /// Bulk jobs one key may have waiting or running; more uploads get 429.
    #[arg(long, env = "EMBEDD_BULK_MAX_JOBS_PER_KEY", default_value_t = 16)]
    pub bulk_max_jobs_per_key: u64,

    /// Finished bulk jobs and their files are deleted after this many hours.
    #[arg(long, env = "EMBEDD_BULK_RETENTION_HOURS", default_value_t = 168)]
    pub bulk_retention_hours: u64,

    /// Mail hook: a shell command run when a bulk job with an email finishes, with
    /// EMBEDD_JOB_ID, EMBEDD_JOB_STATUS, EMBEDD_JOB_EMAIL and EMBEDD_JOB_ERROR set.
    #[arg(long, env = "EMBEDD_BULK_NOTIFY_COMMAND")]
    pub bulk_notify_command: Option<String>,

    /// The key download links are signed with (hex, at least 32 bytes), shared by replicas so
    /// any of them serves any link; default: generated into the data dir.
    #[arg(long, env = "EMBEDD_SIGNING_KEY", hide_env_values = true)]
    pub signing_key: Option<String>,

    /// How long a bulk result download link stays valid, in seconds.
    #[arg(long, env = "EMBEDD_DOWNLOAD_URL_TTL_SECS", default_value_t = 3600)]
    pub download_url_ttl_secs: u64,

    /// Base URL clients reach this server at, for download links (default: the listening
    /// address).
    #[arg(long, env = "EMBEDD_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Build download links from the request's Host header when --public-url is unset (only
    /// behind a proxy that sets it).
    #[arg(long, env = "EMBEDD_TRUST_HOST_HEADER")]
    pub trust_host_header: bool,

    /// A request's headers must arrive within this many seconds, or its connection is closed.
    #[arg(long, env = "EMBEDD_HEADER_READ_TIMEOUT_SECS", default_value_t = 10.0)]
    pub header_read_timeout_secs: f64,

    /// A request's body must arrive within this many seconds (slower: 408).
    #[arg(long, env = "EMBEDD_BODY_READ_TIMEOUT_SECS", default_value_t = 30.0)]
    pub body_read_timeout_secs: f64,

    /// A bulk upload's body must arrive within this many seconds (slower: 408).
    #[arg(long, env = "EMBEDD_UPLOAD_READ_TIMEOUT_SECS", default_value_t = 300.0)]
    pub upload_read_timeout_secs: f64,

    /// A keep-alive connection with no request for this many seconds is closed.
    #[arg(long, env = "EMBEDD_KEEP_ALIVE_TIMEOUT_SECS", default_value_t = 30.0)]
    pub keep_alive_timeout_secs: f64,

    /// Connections open at once; more wait in the listen backlog. Keep it under `ulimit -n`.
    #[arg(long, env = "EMBEDD_MAX_CONNECTIONS", default_value_t = 2048)]
    pub max_connections: usize,

    /// The listen backlog: connections the kernel queues before accepting (capped by
    /// net.core.somaxconn).
    #[arg(long, env = "EMBEDD_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// On SIGTERM, how long in-flight requests and the bulk worker's chunk may take to finish.
    #[arg(long, env = "EMBEDD_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "EMBEDD_JSON_LOGS")]
    pub json_logs: bool,
}

impl Config {
    /// `--max-batch-tokens`, else the device's default.
    pub fn batch_token_budget(&self) -> usize {
        self.max_batch_tokens
            .unwrap_or(self.per_device(16_384, 131_072))
            .max(1)
    }

    /// `--max-batch-size`, else the device's default.
    pub fn batch_size_limit(&self) -> usize {
        self.max_batch_size
            .unwrap_or(self.per_device(64, 512))
            .max(1)
    }

    fn per_device(&self, cpu: usize, gpu: usize) -> usize {
        match self.device {
            DeviceSpec::Cpu => cpu,
            DeviceSpec::Cuda(_) => gpu,
        }
    }
}

/// A duration flag in seconds: at least a millisecond, at most a year (no panics on odd values).
pub fn seconds(secs: f64) -> std::time::Duration {
    let year = std::time::Duration::from_secs(365 * 24 * 3600);
    std::time::Duration::try_from_secs_f64(secs.max(0.001)).map_or(year, |d| d.min(year))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_limits_default_per_device_and_yield_to_flags() {
        let cpu = Config::try_parse_from(["embedd"]).unwrap();
        assert_eq!(
            (cpu.batch_token_budget(), cpu.batch_size_limit()),
            (16_384, 64)
        );
        let gpu = Config::try_parse_from(["embedd", "--device", "cuda"]).unwrap();
        assert_eq!(
            (gpu.batch_token_budget(), gpu.batch_size_limit()),
            (131_072, 512)
        );
        let set = Config::try_parse_from([
            "embedd",
            "--device",
            "cuda:1",
            "--max-batch-tokens",
            "4096",
            "--max-batch-size",
            "0",
        ])
        .unwrap();
        assert_eq!(
            (set.batch_token_budget(), set.batch_size_limit()),
            (4096, 1)
        );
    }
}

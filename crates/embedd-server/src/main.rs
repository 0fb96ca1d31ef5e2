use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use anyhow::Context;
use clap::Parser;
use embedd_server::config::{self, Config};
use embedd_server::{build_state, routes, serve};
use tracing_subscriber::EnvFilter;

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `embedd healthcheck`: GET /health on the configured port; exit 0 when it answers 200.
/// The container image's HEALTHCHECK uses it, so the image needs no curl.
async fn healthcheck(port: u16) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .context("connect timed out")??;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    anyhow::ensure!(
        head.ends_with(b"200"),
        "unhealthy: {}",
        String::from_utf8_lossy(&head)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads, so the allocator's heap limit binds them too.
    embedd_runtime::allocator::keep_freed_buffers();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        let port = std::env::var("EMBEDD_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(8080);
        return healthcheck(port).await;
    }
    if std::env::args().nth(1).as_deref() == Some("pull") {
        // Settings from the environment (EMBEDD_WEIGHTS_DIR, EMBEDD_MODELS_FILE, HF_HOME).
        let config = Config::parse_from(["embedd"]);
        init_logging(config.json_logs);
        let names: Vec<String> = std::env::args().skip(2).collect();
        let pulled = tokio::task::spawn_blocking(move || embedd_server::pull(&config, &names))
            .await
            .context("pull task")?;
        // Each failure was printed with its name; the summary is one line, no backtrace.
        if let Err(e) = pulled {
            eprintln!("embedd pull: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let config = Config::parse();
    init_logging(config.json_logs);
    let state = build_state(&config).await?;
    let listener = serve::bind(
        SocketAddr::new(config.host, config.port),
        config.listen_backlog,
    )
    .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    state.bulk.set_listen_address(addr);
    let worker = tokio::spawn(state.bulk.worker(state.clone()).run());
    let stopping = state.bulk.stopping.clone();
    tracing::info!(%addr, "embedd listening");
    // Tests and supervisors read this line to learn the port when --port 0 is used.
    println!("embedd listening on http://{addr}");

    let grace = std::time::Duration::from_secs(config.shutdown_grace_secs);
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = serve::ConnectionLimits {
        header_read_timeout: config::seconds(config.header_read_timeout_secs),
        idle_timeout: config::seconds(config.keep_alive_timeout_secs),
        max_connections: config.max_connections,
    };
    state
        .concurrency
        .spawn_memory_trim(std::time::Duration::from_secs(1));
    let app = routes::router(state);
    let server = tokio::spawn(serve::serve(listener, app, limits, async move {
        shutdown_signal().await;
        let _ = signalled_tx.send(());
    }));
    // Once the signal arrives, idle connections close at once; in-flight requests and the
    // worker's current chunk get `grace`.
    let serve_result = tokio::select! {
        result = server => result,
        _ = async {
            let _ = signalled_rx.await;
            stopping.store(true, Ordering::Release);
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(seconds = grace.as_secs(), "grace period over: stopping with requests in flight");
            return Ok(());
        }
    };
    serve_result.context("server task")?;
    stopping.store(true, Ordering::Release);
    if tokio::time::timeout(grace, worker).await.is_err() {
        tracing::warn!("the bulk worker did not stop within the grace period");
    }
    tracing::info!("embedd stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received: finishing in-flight requests");
}

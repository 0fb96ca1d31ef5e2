//! GET /ui in headless Chromium (Debian's `chromium`, which .ci/run installs): the page's
//! autorun embeds its sample texts, reranks its sample documents and runs a bulk job against the
//! real server; what the page shows is checked against the API's own answers, and a screenshot
//! is kept as target/ui-test/ui.png.

use std::path::PathBuf;
use std::process::Command;

use embedd_blackbox::*;

const RERANKER: &str = "tiny-bert-cross-encoder";

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    path.is_file().then_some(path)
}

/// Chromium as the machine allows it: headless, no sandbox (CI runs as root), none of the
/// background connections a closed network refuses, a fresh profile.
fn headless(chromium: &PathBuf, profile: &std::path::Path) -> Command {
    let mut command = Command::new(chromium);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=60000",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command
}

/// The values of `attr="..."` in document order.
fn attribute_values(dom: &str, attr: &str) -> Vec<String> {
    let marker = format!("{attr}=\"");
    dom.match_indices(&marker)
        .map(|(at, _)| {
            let rest = &dom[at + marker.len()..];
            rest[..rest.find('"').unwrap_or(0)].to_string()
        })
        .collect()
}

#[test]
fn the_page_embeds_reranks_and_runs_a_bulk_job_in_a_browser() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs chromium for the page test (apt-get install chromium)"
        );
        eprintln!("skipped: no chromium (apt-get install chromium, or set CHROMIUM)");
        return;
    };
    let dir = workspace().join("tests/fixtures/models").join(RERANKER);
    let spec = format!("{RERANKER}={}", dir.display());
    let server = Server::start(&["--model", MODEL, "--model", &spec]);
    let (status, page) = {
        let resp = server.client.get(server.url("/ui")).send().unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    };
    assert_eq!(status, 200);
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );

    let profile = temp_dir("embedd-ui-chromium");
    let out = headless(&chromium, &profile)
        .arg("--dump-dom")
        .arg(server.url("/ui?autorun=1"))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        dom.contains("data-done=\"1\""),
        "autorun did not finish:\n{dom}"
    );
    // Every panel's error line stayed empty.
    assert_eq!(
        dom.matches("class=\"error\"></div>").count(),
        dom.matches("class=\"error\"").count(),
        "a panel failed:\n{dom}"
    );

    // The heatmap: the page's cosines of its three sample texts, as the API's vectors give them.
    let texts = [
        "The cat sits on the mat.",
        "A kitten is resting on a rug.",
        "Stock markets fell sharply today.",
    ];
    let vectors = vectors(&server.embed(json!(texts), json!({})));
    let shown: Vec<f64> = attribute_values(&dom, "data-cosine")
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(shown.len(), 9, "{dom}");
    for i in 0..3 {
        for j in 0..3 {
            let want = cosine(&vectors[i], &vectors[j]);
            assert!(
                (shown[i * 3 + j] - want).abs() < 1e-3,
                "cell {i},{j}: {} vs {want}",
                shown[i * 3 + j]
            );
        }
    }
    assert!(
        shown[1] > shown[2],
        "the cat and the kitten are closer than the cat and the market"
    );

    // Rerank: the page lists the API's order and scores.
    let (_, reranked) = server.post(
        "/v1/rerank",
        &json!({"model": RERANKER, "query": "what do cats like to do", "documents": [
            "Cats spend much of the day sleeping.", "The stock market closed lower.",
            "Kittens love to play with string."]}),
    );
    let order: Vec<String> = reranked["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].to_string())
        .collect();
    assert_eq!(attribute_values(&dom, "data-index"), order);

    // Bulk: the job ran to completion and the page offers its download.
    assert_eq!(attribute_values(&dom, "data-status"), ["completed"]);
    assert!(dom.contains("/result?expires="), "no download link:\n{dom}");

    let shots = workspace().join("target/ui-test");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("ui.png");
    let _ = std::fs::remove_file(&png);
    let status = headless(&chromium, &temp_dir("embedd-ui-chromium-shot"))
        .arg("--window-size=1280,900")
        .arg(format!("--screenshot={}", png.display()))
        .arg(server.url("/ui?autorun=1"))
        .output()
        .unwrap()
        .status;
    assert!(status.success());
    let size = std::fs::metadata(&png).map_or(0, |m| m.len());
    assert!(size > 10_000, "screenshot of {size} bytes");
    let _ = std::fs::remove_dir_all(profile);
}

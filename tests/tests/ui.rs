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

/// A text-image model on the page: a line that is an image data URI goes as an image, and the
/// heatmap compares it with the texts as the API does.
#[test]
fn the_page_compares_images_with_texts() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs chromium for the page test"
        );
        eprintln!("skipped: no chromium");
        return;
    };
    let dir = workspace().join("tests/fixtures/models/tiny-clip");
    let server = Server::start(&["--model", &format!("clip={}", dir.display())]);
    let png = std::fs::read(workspace().join("tests/fixtures/images/astronaut.png"))
        .or_else(|_| std::fs::read(first_fixture_image()))
        .unwrap();
    let image = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png)
    );
    let inputs = format!("a photo of a person\n{image}");
    let url = reqwest::Url::parse_with_params(
        &server.url("/ui"),
        [
            ("autorun", "1"),
            ("embed_model", "clip"),
            ("embed_inputs", inputs.as_str()),
        ],
    )
    .unwrap();
    let profile = temp_dir("embedd-ui-chromium-clip");
    let out = headless(&chromium, &profile)
        .arg("--dump-dom")
        .arg(url.as_str())
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(dom.contains("data-done=\"1\""), "autorun did not finish");
    let shown: Vec<f64> = attribute_values(&dom, "data-cosine")
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(shown.len(), 4, "a 2 x 2 heatmap");
    let live = vectors(
        &server
            .post(
                "/v1/embeddings",
                &json!({"model": "clip", "input": ["a photo of a person", {"image": image}]}),
            )
            .1,
    );
    let want = cosine(&live[0], &live[1]);
    assert!(
        (shown[1] - want).abs() < 1e-3,
        "text-image cosine {} vs {want}",
        shown[1]
    );
    let _ = std::fs::remove_dir_all(profile);
}

/// Some image among the fixtures.
fn first_fixture_image() -> PathBuf {
    let dir = workspace().join("tests/fixtures/images");
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "png" || x == "jpg"))
        .expect("an image fixture")
}

//! `GET /ui`: a page to try the server (embed and compare, rerank, a bulk job), served from the
//! binary and loading nothing from elsewhere; it calls the API with the key typed into it.

/// The page.
pub async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("ui.html"))
}

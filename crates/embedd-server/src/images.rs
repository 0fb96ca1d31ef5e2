//! Image inputs to bytes: data URIs and base64 decoded in place, `http(s)` URLs fetched under
//! limits (size, time, redirects), with addresses that reach this server's own network refused
//! unless `--allow-private-image-urls` (server-side request forgery).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use embedd_api::ImageSource;
use futures_util::StreamExt;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why an image input has no bytes; each becomes a 422 naming the input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    #[error("the image is not valid base64: {0}")]
    Base64(String),
    #[error("the data URI is malformed: {0}")]
    DataUri(String),
    #[error("only http and https image URLs are fetched, not '{0}'")]
    Scheme(String),
    #[error("the image URL is invalid: {0}")]
    Url(String),
    #[error("the image URL's address {0} is in a private, loopback, link-local or metadata range and is not fetched")]
    RefusedAddress(IpAddr),
    #[error("fetching the image failed with HTTP status {0}")]
    Status(u16),
    #[error("fetching the image took longer than {0} s")]
    Timeout(u64),
    #[error("the image is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("fetching the image failed: {0}")]
    Failed(String),
}

#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
    pub allow_private: bool,
}

/// Turns image inputs into bytes; one client shared by every request.
#[derive(Clone)]
pub struct ImageFetcher {
    client: reqwest::Client,
    limits: FetchLimits,
}

const MAX_REDIRECTS: usize = 5;

impl ImageFetcher {
    pub fn new(limits: FetchLimits) -> anyhow::Result<Self> {
        let allow_private = limits.allow_private;
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match check_url(attempt.url(), allow_private) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e.to_string()),
            }
        });
        let client = reqwest::Client::builder()
            .redirect(redirects)
            .timeout(limits.timeout)
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .user_agent(concat!("embedd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, limits })
    }

    /// The bytes of one image input.
    pub async fn bytes(&self, source: &ImageSource) -> Result<Vec<u8>, FetchError> {
        match source {
            ImageSource::Base64(data) => decode_base64(data),
            ImageSource::DataUri(uri) => {
                let (header, data) = uri
                    .split_once(',')
                    .ok_or_else(|| FetchError::DataUri("no ',' before the data".into()))?;
                if !header.ends_with(";base64") {
                    return Err(FetchError::DataUri(
                        "only base64 data URIs (data:image/...;base64,...) are taken".into(),
                    ));
                }
                decode_base64(data)
            }
            ImageSource::Url(url) => self.fetch(url).await,
        }
    }

    async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| FetchError::Url(e.to_string()))?;
        check_url(&parsed, self.limits.allow_private)?;
        let timeout = self.limits.timeout.as_secs();
        let failed = |e: reqwest::Error| {
            refusal_in(&e).unwrap_or_else(|| {
                if e.is_timeout() {
                    FetchError::Timeout(timeout)
                } else {
                    FetchError::Failed(without_url(&e))
                }
            })
        };
        let response = self.client.get(parsed).send().await.map_err(failed)?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let max = self.limits.max_bytes;
        if response.content_length().is_some_and(|n| n > max as u64) {
            return Err(FetchError::TooLarge(max));
        }
        let mut bytes = Vec::new();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(failed)?;
            if bytes.len() + chunk.len() > max {
                return Err(FetchError::TooLarge(max));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }
}

fn decode_base64(data: &str) -> Result<Vec<u8>, FetchError> {
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.trim_end_matches('='))
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(&compact))
        .or_else(|_| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(compact.trim_end_matches('='))
        })
        .map_err(|e| FetchError::Base64(e.to_string()))
}

/// Scheme and, for a literal address, the address itself (host names are checked when they
/// resolve, on every connection, redirects included).
fn check_url(url: &reqwest::Url, allow_private: bool) -> Result<(), FetchError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FetchError::Scheme(url.scheme().to_string()));
    }
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => None,
        None => return Err(FetchError::Url("no host".into())),
    };
    match literal {
        Some(ip) if !allow_private && !is_public(ip) => Err(FetchError::RefusedAddress(ip)),
        _ => Ok(()),
    }
}

/// Whether `ip` is an ordinary public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, cloud metadata among them
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (first == 0x2001 && ip.segments()[1] == 0xdb8) // documentation
        || (first == 0x64 && ip.segments()[1] == 0xff9b)) // NAT64 onto IPv4 ranges
}

/// Resolves host names as the system does, then drops addresses a fetch may not reach.
struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            match (allowed.is_empty(), found.first()) {
                (false, _) => Ok(Box::new(allowed.into_iter()) as Addrs),
                (true, Some(refused)) => Err(Box::new(Refused(refused.ip())) as _),
                (true, None) => Err(format!("{host} has no address").into()),
            }
        })
    }
}

#[derive(Debug)]
struct Refused(IpAddr);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused address {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// A resolver or redirect refusal inside a reqwest error, as the error the client sees.
fn refusal_in(error: &reqwest::Error) -> Option<FetchError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(Refused(ip)) = e.downcast_ref::<Refused>() {
            return Some(FetchError::RefusedAddress(*ip));
        }
        source = e.source();
    }
    if error.is_redirect() {
        return Some(FetchError::Failed(without_url(error)));
    }
    None
}

/// The error with its causes, the URL left out (the client sent it).
fn without_url(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        message.push_str(": ");
        message.push_str(&e.to_string());
        source = e.source();
    }
    match error.url() {
        Some(url) => message
            .replace(&format!(" ({url})"), "")
            .replace(url.as_str(), "the URL"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_ranges_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn urls_are_checked_for_scheme_and_literal_addresses() {
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert_eq!(
            check_url(&url("file:///etc/passwd"), false),
            Err(FetchError::Scheme("file".into()))
        );
        assert!(matches!(
            check_url(&url("http://169.254.169.254/latest/meta-data"), false),
            Err(FetchError::RefusedAddress(_))
        ));
        assert!(check_url(&url("http://127.0.0.1:9/x.png"), true).is_ok());
        assert!(check_url(&url("https://example.com/x.png"), false).is_ok());
    }

    #[test]
    fn data_uris_and_base64_decode() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let fetcher = ImageFetcher::new(FetchLimits {
            max_bytes: 10,
            timeout: Duration::from_secs(1),
            allow_private: false,
        })
        .unwrap();
        let got = rt.block_on(fetcher.bytes(&ImageSource::DataUri(
            "data:image/png;base64,aGVsbG8=".into(),
        )));
        assert_eq!(got.unwrap(), b"hello");
        let got = rt.block_on(fetcher.bytes(&ImageSource::Base64("aGVsbG8".into())));
        assert_eq!(got.unwrap(), b"hello");
        let got = rt.block_on(fetcher.bytes(&ImageSource::DataUri("data:image/png,raw".into())));
        assert!(matches!(got, Err(FetchError::DataUri(_))));
        let got = rt.block_on(fetcher.bytes(&ImageSource::Base64("***".into())));
        assert!(matches!(got, Err(FetchError::Base64(_))));
    }
}

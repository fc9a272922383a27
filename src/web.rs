//! What the two browser pages (`--serve`, the live view; `view`, the dataset browser) share: the
//! bind (an error names the address), the token (required for any address but loopback), the
//! security headers on every answer, and the fixed-route fallback.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

/// Where and how a page is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: String,
    /// Asked of every request; required for any bind address but loopback.
    pub token: Option<String>,
}

/// The default address of both pages.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8765";

/// A random token (from the OS's random source), 32 hex digits.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Scripts, styles and connections from this server only; no inline script, no frames, no forms.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// A bound server: its address (the port chosen when 0 was asked), and its URL.
pub struct Server {
    pub addr: SocketAddr,
    pub url: String,
    /// The URL with the token, to print once on the terminal (never in a log).
    pub url_with_token: String,
}

/// Binds `opts.addr` (an error names the address; `flag` is how the user gave it) and serves
/// `app` on the tokio runtime until the process ends. A token is made when the address is not
/// loopback and none was given; every request must then carry it.
pub async fn serve(opts: &ServeOptions, flag: &str, app: axum::Router) -> anyhow::Result<Server> {
    if let Some(t) = &opts.token {
        check_token(t)?;
    }
    let listener = tokio::net::TcpListener::bind(&opts.addr).await.with_context(|| {
        let hint = if opts.addr.contains(':') { "" } else { " (ADDR is IP:PORT, e.g. 127.0.0.1:8765 or 0.0.0.0:8765; port 0 picks a free one)" };
        format!("{flag} {}: cannot listen there{hint}", opts.addr)
    })?;
    let addr = listener.local_addr()?;
    let token = match (&opts.token, addr.ip().is_loopback()) {
        (Some(t), _) => Some(t.clone()),
        (None, true) => None,
        (None, false) => Some(new_token().context("cannot make a token for the page")?),
    };
    let url = format!("http://{addr}/");
    let url_with_token = match &token {
        Some(t) => format!("{url}?token={t}"),
        None => url.clone(),
    };
    let token = Arc::new(token);
    let app = app
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "no such page\n") })
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move { guard(token.as_ref().as_deref(), req, next).await }
        }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Server { addr, url, url_with_token })
}

/// What to print under the URL, if anything: an address for every interface is not one a
/// browser can open as it is.
pub fn url_hint(server: &Server) -> Option<String> {
    server.addr.ip().is_unspecified().then(|| format!("(listening on every address: open it with this machine's name or address in place of {})", server.addr.ip()))
}

/// A token given by the user: long enough not to be guessed, and plain enough to go in a URL
/// as it is.
pub fn check_token(t: &str) -> anyhow::Result<()> {
    if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)) {
        anyhow::bail!(
            "--serve-token (or DATA_GENERATOR_SERVE_TOKEN): give at least 16 characters of A-Z, a-z, 0-9, '-', '_', '.', '~' \
             (whoever has the token can read the page), or none to have one made"
        );
    }
    Ok(())
}

/// Whether a `Host` header names this machine's loopback (any port): what a page opened at
/// the printed URL, or through an ssh tunnel, sends. Another name pointing at 127.0.0.1 (DNS
/// rebinding) is some web site's page reading this one.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What a page loads by itself, without the token (a `<link>` or `<script>` cannot carry it):
/// the same files for everyone, built into the binary, with no data in them.
const PUBLIC: &[&str] = &["/app.css", "/app.js", "/view.css", "/view.js"];

/// Every request: the token when one is set, else a loopback `Host`; every answer: the
/// security headers.
async fn guard(token: Option<&str>, req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    if token.is_none() {
        let host = req.headers().get("host").and_then(|v| v.to_str().ok());
        if host.is_some_and(|h| !loopback_host(h)) {
            return (axum::http::StatusCode::FORBIDDEN, "this page answers on its loopback address only (open the URL data_generator printed)\n").into_response();
        }
    }
    if let Some(t) = token.filter(|_| !PUBLIC.contains(&req.uri().path())) {
        let given = req.uri().query().into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix("token="));
        let bearer = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given.or(bearer).is_none_or(|g| !constant_time_eq(g.as_bytes(), t.as_bytes())) {
            return (axum::http::StatusCode::UNAUTHORIZED, "a token is needed: open the URL data_generator printed\n").into_response();
        }
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert("content-security-policy", axum::http::HeaderValue::from_static(CSP));
    h.insert("x-content-type-options", axum::http::HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", axum::http::HeaderValue::from_static("no-referrer"));
    h.insert("cache-control", axum::http::HeaderValue::from_static("no-store"));
    resp
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An answer with a body and its content type.
pub fn page(content_type: &'static str, body: impl Into<axum::body::Body>) -> axum::response::Response {
    axum::response::Response::builder()
        .header("content-type", content_type)
        .body(body.into())
        .unwrap_or_default()
}

/// A JSON answer.
pub fn json(body: String) -> axum::response::Response {
    page("application/json", body)
}

/// A 400 answer that says what was wrong with the request.
pub fn bad_request(msg: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (axum::http::StatusCode::BAD_REQUEST, msg).into_response()
}

/// Percent-decoding of one query-string component (`+` is a space), for the fixed parameters
/// of the pages' API. Invalid UTF-8 is replaced, never an error.
pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit() => {
                let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push(hex(b[i + 1]) * 16 + hex(b[i + 2]));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The parameters of a query string, decoded (`token` left out).
pub fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (url_decode(k), url_decode(v))
        })
        .filter(|(k, _)| k != "token")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_hosts() {
        assert!(check_token("").is_err());
        assert!(check_token("short").is_err());
        assert!(check_token("0123456789abcdef&x").is_err());
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(check_token(&new_token().unwrap()).is_ok());
        for h in ["127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765", "127.0.0.2:80", "localhost"] {
            assert!(loopback_host(h), "{h}");
        }
        for h in ["evil.example:8765", "evil.example", "10.0.0.1:8765", "localhost.evil.example:8765", "[::2]:1"] {
            assert!(!loopback_host(h), "{h}");
        }
    }

    #[test]
    fn url_decoding() {
        assert_eq!(url_decode("a+b%20c"), "a b c");
        assert_eq!(url_decode("%E2%9C%93"), "✓");
        assert_eq!(url_decode("100%"), "100%");
        assert_eq!(url_decode("%zz%4"), "%zz%4");
        assert_eq!(url_decode("%+1"), "% 1");
        assert_eq!(url_decode("%3Cimg%3E"), "<img>");
        let q = query_pairs(Some("q=caf%C3%A9&token=abc&stage=judge&empty="));
        assert_eq!(q, vec![("q".into(), "café".into()), ("stage".into(), "judge".into()), ("empty".into(), String::new())]);
    }
}

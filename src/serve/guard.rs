//! Who may use `shardctl serve`: the checks every request passes before it is routed.
//!
//! The server holds the cluster key, so a request it answers runs on the keyed cluster. A browser
//! lets any web page send requests to loopback, and a DNS-rebinding name makes such a page
//! same-origin with the server; so, in this order (each refusal in OpenAI's error shape):
//! 1. `Host` (RFC 9110 section 7.2) must be an IP literal, `localhost`, or an `--allowed-host`
//!    name, else 403: a rebinding name is a name the operator did not list.
//! 2. `Origin` (RFC 6454), when present, must be the server's own (`http://` + `Host`) or a
//!    `--cors-origin`, else 403. An allowed cross origin gets its own value back in
//!    `Access-Control-Allow-Origin`, never `*`.
//! 3. With `--api-key-file`, `/v1/*` and `/metrics` need `Authorization: Bearer KEY` (checked
//!    with `hmac`'s constant-time `verify_slice`), else 401 `invalid_api_key`. `/health`, the
//!    chat page and CORS preflights stay open.
//! 4. A POST body must be `Content-Type: application/json`, else 415: a page can send
//!    `text/plain` cross-origin without a preflight (a CORS "simple" request), never JSON.

use std::path::Path;

use anyhow::{Context, Result, bail};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::openai::ApiError;

type HmacSha256 = Hmac<Sha256>;

/// The environment variable naming the API key file when `--api-key-file` is not given.
pub const API_KEY_ENV: &str = "SHARDNET_API_KEY_FILE";
/// Largest API key file read, bytes.
const MAX_KEY_FILE: u64 = 4096;

/// The HTTP API key. Held as HMAC-SHA-256 under a random per-process key of the API key, so a
/// presented key is compared by MAC (fixed length, constant time) and never byte by byte.
#[derive(Clone)]
pub struct ApiKey {
    mac: HmacSha256,
    tag: Vec<u8>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl ApiKey {
    /// The key itself (surrounding whitespace and the trailing newline removed by the caller).
    /// Errors: an empty key, or one that is not visible ASCII (it must fit a header).
    pub fn new(key: &str) -> Result<ApiKey> {
        if key.is_empty() {
            bail!("the API key is empty");
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("the API key must be visible ASCII characters without spaces (it is sent in an HTTP header)");
        }
        let secret = crate::protocol::auth::random_bytes::<32>().context("reading random bytes")?;
        let mac = HmacSha256::new_from_slice(&secret).expect("HMAC takes any key length");
        let tag = mac.clone().chain_update(key.as_bytes()).finalize().into_bytes().to_vec();
        Ok(ApiKey { mac, tag })
    }

    /// Reads the key from a file (at most 4 KiB; surrounding whitespace is dropped).
    pub fn load(path: &Path) -> Result<ApiKey> {
        let len =
            std::fs::metadata(path).with_context(|| format!("reading the API key file {}", path.display()))?.len();
        if len > MAX_KEY_FILE {
            bail!("the API key file {} is {len} bytes, over {MAX_KEY_FILE}", path.display());
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading the API key file {}", path.display()))?;
        ApiKey::new(text.trim()).with_context(|| format!("the API key file {}", path.display()))
    }

    /// Whether `presented` is the key, in time that does not depend on where they differ.
    pub fn verify(&self, presented: &str) -> bool {
        self.mac.clone().chain_update(presented.as_bytes()).verify_slice(&self.tag).is_ok()
    }
}

/// The access rules of one server (`shardctl serve`'s flags).
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// `--cors-origin`: origins (`scheme://host[:port]`) whose pages may call the API.
    pub cors_origins: Vec<String>,
    /// `--allowed-host`: names besides IP literals and `localhost` accepted in `Host`.
    pub allowed_hosts: Vec<String>,
    /// `--api-key-file`: the key `/v1/*` and `/metrics` require.
    pub api_key: Option<ApiKey>,
}

/// The host part of a `Host` value (`name`, `name:port`, `[v6]:port`), lower-cased.
fn host_name(host: &str) -> String {
    let h = host.trim();
    let name = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        h.rsplit_once(':').map_or(h, |(n, port)| if port.bytes().all(|b| b.is_ascii_digit()) { n } else { h })
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Access {
    /// Step 1: the `Host` header. An IP literal cannot be rebound, so any is accepted (a server
    /// on 0.0.0.0 is reached by its LAN address); names must be `localhost` or listed. A request
    /// without `Host` (HTTP/1.0) is not from a browser and passes.
    pub fn check_host(&self, host: Option<&str>) -> Result<(), ApiError> {
        let Some(host) = host else { return Ok(()) };
        let name = host_name(host);
        if name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || self.allowed_hosts.iter().any(|a| a.eq_ignore_ascii_case(&name))
        {
            return Ok(());
        }
        Err(ApiError::new(
            403,
            "invalid_request_error",
            Some("host_not_allowed"),
            format!(
                "the Host {name:?} is not this server's (DNS rebinding?); start shardctl serve with --allowed-host {name} to accept it"
            ),
        ))
    }

    /// Step 2: the `Origin` header. `Ok(Some(origin))` for a listed cross origin (to echo in
    /// `Access-Control-Allow-Origin`), `Ok(None)` for none or the server's own.
    pub fn check_origin(&self, origin: Option<&str>, host: Option<&str>) -> Result<Option<String>, ApiError> {
        let Some(origin) = origin else { return Ok(None) };
        if let Some(host) = host
            && origin.eq_ignore_ascii_case(&format!("http://{}", host.trim()))
        {
            return Ok(None);
        }
        if let Some(o) = self.cors_origins.iter().find(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin)) {
            return Ok(Some(o.trim_end_matches('/').to_string()));
        }
        Err(ApiError::new(
            403,
            "invalid_request_error",
            Some("origin_not_allowed"),
            format!(
                "cross-origin requests from {origin:?} are refused; start shardctl serve with --cors-origin {origin} to allow that page"
            ),
        ))
    }

    /// Step 3: the API key, for a path that needs it.
    pub fn check_key(&self, path: &str, authorization: Option<&str>) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else { return Ok(()) };
        if !(path.starts_with("/v1/") || path == "/v1" || path == "/metrics") {
            return Ok(());
        }
        let presented = authorization.and_then(|a| {
            let (scheme, token) = a.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        match presented {
            Some(token) if key.verify(token) => Ok(()),
            Some(_) => Err(unauthorized("Incorrect API key provided.")),
            None => Err(unauthorized(
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )),
        }
    }
}

fn unauthorized(msg: &str) -> ApiError {
    ApiError::new(401, "invalid_request_error", Some("invalid_api_key"), msg.to_string())
}

/// Step 4: a POST body's media type must be `application/json` (parameters allowed).
pub fn check_json(content_type: Option<&str>) -> Result<(), ApiError> {
    let media = content_type.and_then(|c| c.split(';').next()).map(str::trim).unwrap_or("");
    if media.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(ApiError::new(
        415,
        "invalid_request_error",
        None,
        format!("the request body must be sent as Content-Type: application/json, not {media:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_ip_literals_and_listed_names() {
        let a = Access { allowed_hosts: vec!["gpu.lan".into()], ..Access::default() };
        for ok in ["127.0.0.1:8080", "[::1]:80", "localhost:1", "LOCALHOST", "10.0.0.2", "gpu.lan:8080", "gpu.lan."] {
            assert!(a.check_host(Some(ok)).is_ok(), "{ok}");
        }
        for bad in ["rebind.evil.example", "evil:8080", "localhost.evil.example", "127.0.0.1.nip.io"] {
            assert_eq!(a.check_host(Some(bad)).unwrap_err().status, 403, "{bad}");
        }
    }

    #[test]
    fn api_keys_compare_by_mac() {
        let k = ApiKey::new("sk-test-123").unwrap();
        assert!(k.verify("sk-test-123"));
        assert!(!k.verify("sk-test-12") && !k.verify("sk-test-1234") && !k.verify(""));
        assert!(ApiKey::new("").is_err() && ApiKey::new("a b").is_err());
        let a = Access { api_key: Some(k), ..Access::default() };
        assert!(a.check_key("/health", None).is_ok());
        assert_eq!(a.check_key("/v1/models", Some("Basic sk-test-123")).unwrap_err().status, 401);
        assert!(a.check_key("/v1/models", Some("Bearer sk-test-123")).is_ok());
    }

    #[test]
    fn json_media_type() {
        assert!(check_json(Some("application/json; charset=utf-8")).is_ok());
        assert_eq!(check_json(Some("text/plain")).unwrap_err().status, 415);
        assert_eq!(check_json(None).unwrap_err().status, 415);
    }
}

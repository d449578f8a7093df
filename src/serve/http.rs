//! HTTP/1.1 on a blocking socket, for `shardctl serve`: requests read with `httparse` under
//! bounds on the head, the body and the time each may take (RFC 9112), responses with a
//! `Content-Length` or chunked (the server-sent event streams). No async runtime: one connection
//! per thread, every read under a deadline.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// What a client may make the server hold or wait for on one connection.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Request line and headers together, bytes (over it: 431).
    pub max_head: usize,
    /// Header fields (over it: 431).
    pub max_headers: usize,
    /// Body bytes (over it: 413, refused from `Content-Length` before any is read).
    pub max_body: usize,
    /// From a request's first byte to the end of its head (slow clients: closed after it).
    pub head_timeout: Duration,
    /// For the whole body once the head is in.
    pub body_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub idle_timeout: Duration,
    /// Bound on each write (a client that does not read is dropped after it).
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_head: 16 << 10,
            max_headers: 64,
            max_body: 1 << 20,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// One parsed request. Header names are lower-cased.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The request target's path, without the query.
    pub path: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the connection stays open after the response (HTTP/1.1 unless `Connection: close`,
    /// HTTP/1.0 only with `Connection: keep-alive`).
    pub keep_alive: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Why no request came.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection, or stayed idle past the idle timeout, between requests.
    Closed,
    /// The client stopped mid-request (past the head or body deadline) or the socket failed.
    Io(io::Error),
    /// A request the server refuses: the status and the reason, answered before closing.
    Bad(u16, String),
}

/// A client connection: the socket and what was read past the last request (pipelining).
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

const READ_CHUNK: usize = 8 << 10;

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        Conn { stream, buf: Vec::new() }
    }

    /// Reads into `buf` until `deadline`; Ok(0) at EOF.
    fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let old = self.buf.len();
        self.buf.resize(old + READ_CHUNK, 0);
        let r = loop {
            match self.stream.read(&mut self.buf[old..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        self.buf.truncate(old + *r.as_ref().unwrap_or(&0));
        r
    }

    /// Reads the next request under `limits`: waits up to `idle_timeout` for its first byte, then
    /// `head_timeout` for the head and `body_timeout` for the body.
    pub fn read_request(&mut self, limits: &Limits) -> Result<Request, ReadError> {
        let idle_deadline = Instant::now() + limits.idle_timeout;
        while self.buf.is_empty() {
            match self.fill(idle_deadline) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(ReadError::Closed),
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        let head_deadline = Instant::now() + limits.head_timeout;
        let (head_len, mut req, content_length) = loop {
            match parse_head(&self.buf, limits)? {
                Some(parsed) => break parsed,
                None if self.buf.len() >= limits.max_head => {
                    return Err(ReadError::Bad(431, format!("request head over {} bytes", limits.max_head)));
                }
                None => match self.fill(head_deadline) {
                    Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
                    Ok(_) => {}
                    Err(e) => return Err(ReadError::Io(e)),
                },
            }
        };
        if content_length > limits.max_body {
            return Err(ReadError::Bad(
                413,
                format!("request body of {content_length} bytes is over the limit of {} bytes", limits.max_body),
            ));
        }
        self.buf.drain(..head_len);
        let body_deadline = Instant::now() + limits.body_timeout;
        while self.buf.len() < content_length {
            match self.fill(body_deadline) {
                Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        req.body = self.buf.drain(..content_length).collect();
        if self.buf.capacity() > 4 * READ_CHUNK {
            self.buf.shrink_to(READ_CHUNK);
        }
        Ok(req)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Parses a request head at the start of `buf`: `None` while incomplete, else its length, the
/// request (body still empty) and the body's length from `Content-Length`.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<(usize, Request, usize)>, ReadError> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ReadError::Bad(431, format!("more than {} header fields", limits.max_headers)));
        }
        Err(e) => return Err(ReadError::Bad(400, format!("malformed HTTP request: {e}"))),
    };
    if head_len > limits.max_head {
        return Err(ReadError::Bad(431, format!("request head over {} bytes", limits.max_head)));
    }
    let minor_version = parsed.version.unwrap_or(1);
    let method = parsed.method.unwrap_or("").to_string();
    let target = parsed.path.unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    let mut out = Vec::with_capacity(parsed.headers.len());
    let mut content_length: Option<usize> = None;
    let mut connection = String::new();
    for h in parsed.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(h.value).trim().to_string();
        match name.as_str() {
            "content-length" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| ReadError::Bad(400, format!("Content-Length {value:?} is not a byte count")))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(ReadError::Bad(400, "conflicting Content-Length fields".into()));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                return Err(ReadError::Bad(411, "chunked request bodies are not accepted: send Content-Length".into()));
            }
            "connection" => connection = value.to_ascii_lowercase(),
            _ => {}
        }
        out.push((name, value));
    }
    let tokens: Vec<&str> = connection.split(',').map(str::trim).collect();
    let keep_alive = if minor_version == 0 { tokens.contains(&"keep-alive") } else { !tokens.contains(&"close") };
    let req = Request { method, path, minor_version, headers: out, body: Vec::new(), keep_alive };
    Ok(Some((head_len, req, content_length.unwrap_or(0))))
}

/// The reason phrase of the statuses this server sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// The header every response carries. No wildcard CORS: a cross-origin page is let in only by
/// `--cors-origin`, per response ([`Reply::allow_origin`]).
const COMMON: &str = "Server: shardnet\r\n";

/// How a response ends its connection and which origin it lets read it.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    pub keep_alive: bool,
    /// `Access-Control-Allow-Origin`: the request's own `Origin`, when `--cors-origin` names it
    /// (never `*`); sent with `Vary: Origin`.
    pub allow_origin: Option<String>,
}

impl Reply {
    /// A response after which the connection closes, readable by no other origin.
    pub fn close() -> Reply {
        Reply { keep_alive: false, allow_origin: None }
    }

    fn cors_headers(&self) -> String {
        match &self.allow_origin {
            Some(o) => format!("Access-Control-Allow-Origin: {o}\r\nVary: Origin\r\n"),
            None => String::new(),
        }
    }
}

/// Writes a whole response with a `Content-Length` body.
pub fn write_response(
    w: &mut impl Write,
    status: u16,
    content_type: &str,
    extra: &[(&str, String)],
    body: &[u8],
    reply: &Reply,
) -> io::Result<()> {
    let keep_alive = reply.keep_alive;
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\n{COMMON}{}Content-Type: {content_type}\r\n",
        reason(status),
        reply.cors_headers()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    ));
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

/// A `text/event-stream` response: chunked under HTTP/1.1 (the connection can stay open),
/// delimited by closing the connection under HTTP/1.0.
pub struct EventStream<'a, W: Write> {
    w: &'a mut W,
    chunked: bool,
}

impl<'a, W: Write> EventStream<'a, W> {
    pub fn start(w: &'a mut W, minor_version: u8, reply: &Reply) -> io::Result<EventStream<'a, W>> {
        let keep_alive = reply.keep_alive;
        let chunked = minor_version >= 1;
        let framing = if chunked {
            format!("Transfer-Encoding: chunked\r\nConnection: {}\r\n", if keep_alive { "keep-alive" } else { "close" })
        } else {
            "Connection: close\r\n".to_string()
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\n{COMMON}{}Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n{framing}\r\n",
            reply.cors_headers()
        );
        w.write_all(head.as_bytes())?;
        w.flush()?;
        Ok(EventStream { w, chunked })
    }

    /// Sends one event: `data: {data}` and a blank line.
    pub fn send(&mut self, data: &str) -> io::Result<()> {
        let event = format!("data: {data}\n\n");
        if self.chunked {
            let mut out = format!("{:x}\r\n", event.len()).into_bytes();
            out.extend_from_slice(event.as_bytes());
            out.extend_from_slice(b"\r\n");
            self.w.write_all(&out)?;
        } else {
            self.w.write_all(event.as_bytes())?;
        }
        self.w.flush()
    }

    /// Ends the stream (the last chunk).
    pub fn finish(self) -> io::Result<()> {
        if self.chunked {
            self.w.write_all(b"0\r\n\r\n")?;
        }
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &[u8] = b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";

    #[test]
    fn a_head_split_at_every_byte_is_incomplete_until_its_end() {
        let limits = Limits::default();
        let head_len = REQ.len() - 2;
        for cut in 0..head_len {
            assert!(parse_head(&REQ[..cut], &limits).unwrap().is_none(), "cut {cut}");
        }
        let (n, req, body) = parse_head(REQ, &limits).unwrap().unwrap();
        assert_eq!((n, body), (head_len, 2));
        assert_eq!((req.method.as_str(), req.path.as_str(), req.minor_version), ("POST", "/v1/completions", 1));
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert!(req.keep_alive);
    }

    #[test]
    fn connection_close_and_http_1_0_keep_alive() {
        let limits = Limits::default();
        let close = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert!(!parse_head(close, &limits).unwrap().unwrap().1.keep_alive);
        let old = b"GET / HTTP/1.0\r\n\r\n";
        assert!(!parse_head(old, &limits).unwrap().unwrap().1.keep_alive);
        let old_ka = b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
        assert!(parse_head(old_ka, &limits).unwrap().unwrap().1.keep_alive);
    }

    #[test]
    fn bad_heads_are_refused_with_their_status() {
        let limits = Limits { max_headers: 4, ..Limits::default() };
        let status = |b: &[u8]| match parse_head(b, &limits) {
            Err(ReadError::Bad(s, _)) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(status(b"GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\n\r\n"), 431);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), 400);
        assert_eq!(status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 411);
        assert_eq!(status(b"GET\x01 / HTTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn an_event_stream_is_chunked_under_http_1_1() {
        let mut out = Vec::new();
        let mut s = EventStream::start(&mut out, 1, &Reply { keep_alive: true, allow_origin: None }).unwrap();
        s.send("{\"a\":1}").unwrap();
        s.finish().unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Transfer-Encoding: chunked\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nf\r\ndata: {\"a\":1}\n\n\r\n0\r\n\r\n"), "{text:?}");
    }
}

//! A deliberately small HTTP/1.x server for `/metrics` and `/stats`, on TCP (`--metrics`)
//! and on a Unix socket beside the vhost-user socket (for `guardblk stats --socket`).
//!
//! One thread per listener, one request per connection, answered and closed: a scraper or
//! the `stats` command every few seconds is the whole load. Requests are bounded (head of at
//! most [`MAX_REQUEST_BYTES`], [`IO_TIMEOUT`] to send it), so a stuck or hostile client
//! delays the next scrape by at most that and never touches the I/O path.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use super::Telemetry;

/// Longest request head read; longer requests get 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request or receive the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// What the server answers to one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    }
}

const INDEX: &str =
    "guardblk\n  /metrics  Prometheus text format\n  /stats    the stats document (JSON)\n";

/// Answer a request head (everything up to the blank line).
pub fn respond(head: &[u8], telemetry: &Arc<Telemetry>) -> Response {
    let Some(line) = std::str::from_utf8(head)
        .ok()
        .and_then(|h| h.split("\r\n").next())
    else {
        return Response::text(400, "request is not UTF-8\n");
    };
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Response::text(400, "expected \"METHOD /path HTTP/1.1\"\n");
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Response::text(400, "expected \"METHOD /path HTTP/1.1\"\n");
    }
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "only GET and HEAD\n");
    }
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: super::prometheus::CONTENT_TYPE,
            body: super::prometheus::encode(telemetry),
        },
        "/stats" => match serde_json::to_string_pretty(&telemetry.stats()) {
            Ok(json) => Response {
                status: 200,
                content_type: "application/json",
                body: json + "\n",
            },
            Err(e) => Response::text(500, format!("cannot encode the stats: {e}\n")),
        },
        "/" => Response::text(200, INDEX),
        _ => Response::text(404, format!("no {path} here; try /metrics or /stats\n")),
    }
}

/// Read one request head, answer it, close.
fn serve_one(mut stream: impl Read + Write, telemetry: &Arc<Telemetry>) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let response = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            break respond(&head, telemetry);
        }
        if head.len() > MAX_REQUEST_BYTES {
            break Response::text(431, "request head too large\n");
        }
        match stream.read(&mut chunk) {
            Ok(0) if head.is_empty() => return Ok(()),
            Ok(0) => break Response::text(400, "request ended before its blank line\n"),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break Response::text(408, "request not received in time\n")
            }
            Err(e) => return Err(e),
        }
    };
    let is_head = head.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    if response.status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !is_head {
        out.push_str(&response.body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()?;
    // (Not after a timeout: that client sends nothing, and waiting again only delays the next.)
    if response.status != 200 && response.status != 408 {
        // Closing with unread bytes makes the kernel reset the connection, which can discard
        // the answer before the client reads it: read what the client still sends (bounded
        // by MAX_DRAIN_BYTES and the read timeout) first.
        let mut drained = 0;
        while drained < MAX_DRAIN_BYTES {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
    Ok(())
}

/// At most this much of a refused request is read and discarded before closing.
const MAX_DRAIN_BYTES: usize = 1 << 20;

/// A connected client of either listener: what the accept loop needs of it.
trait Client: Read + Write {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()>;
}

impl Client for std::net::TcpStream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl Client for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

/// Answer `connections` one at a time, on a thread named `name`, for the daemon's lifetime.
/// An accept that fails (out of descriptors, say) is retried after a pause, so a lasting
/// failure cannot turn the thread into a busy loop.
fn spawn_accept_loop<C: Client>(
    name: &str,
    connections: impl Iterator<Item = io::Result<C>> + Send + 'static,
    telemetry: Arc<Telemetry>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for connection in connections {
                let stream = match connection {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot accept a metrics connection");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let _ = stream.set_timeouts(IO_TIMEOUT);
                if let Err(e) = serve_one(stream, &telemetry) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            }
        })?;
    Ok(())
}

/// Serve `listener` (`--metrics`) on a thread of its own for the daemon's lifetime.
pub fn spawn_tcp(listener: TcpListener, telemetry: Arc<Telemetry>) -> io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let connections = std::iter::repeat_with(move || listener.accept().map(|(s, _)| s));
    spawn_accept_loop("metrics-http", connections, telemetry)?;
    Ok(addr)
}

/// The same on the stats socket.
pub fn spawn_unix(listener: UnixListener, telemetry: Arc<Telemetry>) -> io::Result<()> {
    let connections = std::iter::repeat_with(move || listener.accept().map(|(s, _)| s));
    spawn_accept_loop("stats-socket", connections, telemetry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(request: &str) -> Response {
        let t = Arc::new(Telemetry::new(1, "/tmp/x.img".into(), None));
        respond(request.as_bytes(), &t)
    }

    #[test]
    fn routes_and_refusals() {
        assert_eq!(answer("GET /metrics HTTP/1.1\r\nHost: x").status, 200);
        assert_eq!(answer("GET /metrics?x=1 HTTP/1.0").status, 200);
        let stats = answer("GET /stats HTTP/1.1");
        assert_eq!(stats.status, 200);
        assert!(serde_json::from_str::<super::super::DaemonStats>(&stats.body).is_ok());
        assert_eq!(answer("GET / HTTP/1.1").status, 200);
        assert_eq!(answer("GET /nope HTTP/1.1").status, 404);
        assert_eq!(answer("POST /metrics HTTP/1.1").status, 405);
        assert_eq!(answer("garbage").status, 400);
        assert_eq!(answer("GET metrics HTTP/1.1").status, 400);
        assert_eq!(answer("GET /metrics SPDY/3").status, 400);
        assert_eq!(
            respond(
                &[0xff, 0xfe],
                &Arc::new(Telemetry::new(1, "x".into(), None))
            )
            .status,
            400
        );
    }

    /// A stream that hands out `input` and records what is written.
    struct Fake {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn exchange(input: Vec<u8>) -> String {
        let t = Arc::new(Telemetry::new(1, "x".into(), None));
        let mut fake = Fake {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        serve_one(&mut fake, &t).unwrap();
        String::from_utf8(fake.output).unwrap()
    }

    #[test]
    fn whole_exchanges() {
        let ok = exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec());
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("guardblk_frontend_connected 0"), "{ok}");
        let head = exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n".to_vec());
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
        let cut = exchange(b"GET /metr".to_vec());
        assert!(cut.starts_with("HTTP/1.1 400 "), "{cut}");
        let huge = exchange(vec![b'a'; MAX_REQUEST_BYTES + 2048]);
        assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");
        assert_eq!(
            exchange(Vec::new()),
            "",
            "a connection closed at once gets nothing"
        );
    }
}

//! An open-loop HTTP/1.1 load generator for loopback servers.
//!
//! Each query is sent at its scheduled time on an idle keep-alive
//! connection (or a new one), whether or not earlier queries have been
//! answered: the generator never waits for the server, so a slow server
//! builds a queue and is charged for it. It speaks just enough HTTP/1.1 for
//! JSON requests to `handoff serve` and uvicorn (`Content-Length` bodies).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Level;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("load tests only target loopback; {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    #[error("{addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: malformed HTTP response: {detail}")]
    Protocol { addr: SocketAddr, detail: String },
}

/// One answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Most queries in flight at once; beyond it a query is not sent and counts
/// as unserved (the server is saturated anyway), which bounds the sockets a
/// run can open.
pub const MAX_IN_FLIGHT: usize = 512;

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn check_loopback(addr: SocketAddr) -> Result<(), HttpError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(HttpError::NotLoopback(addr))
    }
}

async fn connect(addr: SocketAddr) -> Result<Conn, HttpError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Io { addr, source })?;
    // Requests are small and latency is what is measured.
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        stream,
        buf: Vec::with_capacity(16 * 1024),
    })
}

fn request_bytes(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Sends one request on `conn` and reads the answer; `Ok((response,
/// reusable))`.
async fn exchange(
    conn: &mut Conn,
    addr: SocketAddr,
    request: &[u8],
) -> Result<(Response, bool), HttpError> {
    let io = |source| HttpError::Io { addr, source };
    let bad = |detail: String| HttpError::Protocol { addr, detail };
    conn.stream.write_all(request).await.map_err(io)?;
    conn.buf.clear();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&conn.buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(bad("connection closed before the response headers".into()));
        }
        conn.buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&conn.buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("status line {:?}", head.lines().next())))?;
    let mut length = None;
    let mut reusable = true;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                reusable = false;
            } else if k == "transfer-encoding" {
                return Err(bad(format!("transfer-encoding {v} is not supported")));
            }
        }
    }
    let length = length.ok_or_else(|| bad("no Content-Length".into()))?;
    while conn.buf.len() < head_end + length {
        let n = conn.stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(bad("connection closed inside the body".into()));
        }
        conn.buf.extend_from_slice(&chunk[..n]);
    }
    let body = conn.buf[head_end..head_end + length].to_vec();
    Ok((Response { status, body }, reusable))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request on a fresh connection (health checks, the output check).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<Response, HttpError> {
    check_loopback(addr)?;
    let mut conn = connect(addr).await?;
    exchange(&mut conn, addr, &request_bytes(addr, method, path, body))
        .await
        .map(|(r, _)| r)
}

/// Runs one open-loop level: query `i` is `bodies[i % bodies.len()]` POSTed
/// to `path` at `schedule[i]`. A non-2xx answer or an I/O error counts as an
/// error; queries not answered by the end of the grace period are unserved.
pub async fn run_level(
    addr: SocketAddr,
    path: &str,
    bodies: &[Vec<u8>],
    target_qps: f64,
    schedule: &[Duration],
) -> Result<Level, HttpError> {
    check_loopback(addr)?;
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        bodies
            .iter()
            .map(|b| request_bytes(addr, "POST", path, b))
            .collect(),
    );
    let idle: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::new()));
    // Open a few connections before the clock starts, as a client pool would.
    for _ in 0..4 {
        let c = connect(addr).await?;
        idle.lock().expect("pool lock").push(c);
    }
    let start = Instant::now();
    let deadline = start + schedule.last().copied().unwrap_or_default() + crate::grace(schedule);
    let mut set: JoinSet<(Duration, bool, Duration)> = JoinSet::new();
    let mut latencies = Vec::with_capacity(schedule.len());
    let mut errors = 0u64;
    let mut last = Duration::ZERO;
    let mut record = |(lat, ok, done): (Duration, bool, Duration)| {
        if ok {
            latencies.push(lat.as_secs_f64() * 1e3);
        } else {
            errors += 1;
        }
        last = last.max(done);
    };
    for (i, &at) in schedule.iter().enumerate() {
        let due = start + at;
        // Collect answers while waiting for the next arrival.
        loop {
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(due) => break,
                Some(done) = set.join_next(), if !set.is_empty() => {
                    if let Ok(d) = done { record(d); }
                }
            }
        }
        if Instant::now() > deadline {
            break;
        }
        if set.len() >= MAX_IN_FLIGHT {
            continue;
        }
        let requests = Arc::clone(&requests);
        let idle = Arc::clone(&idle);
        set.spawn(async move {
            let request = &requests[i % requests.len()];
            let pooled = idle.lock().expect("pool lock").pop();
            // A pooled connection the server closed while it sat idle
            // (uvicorn drops keep-alive connections after 5 s) fails before
            // any answer: retry once on a fresh one, as HTTP clients do.
            let mut attempt = match pooled {
                Some(c) => Some((c, true)),
                None => connect(addr).await.ok().map(|c| (c, false)),
            };
            let mut result = false;
            while let Some((mut c, was_pooled)) = attempt.take() {
                match exchange(&mut c, addr, request).await {
                    Ok((r, reusable)) => {
                        if reusable {
                            idle.lock().expect("pool lock").push(c);
                        }
                        result = (200..300).contains(&r.status);
                    }
                    Err(_) if was_pooled => {
                        attempt = connect(addr).await.ok().map(|c| (c, false));
                    }
                    Err(_) => {}
                }
            }
            let now = Instant::now();
            (now - due, result, now - start)
        });
    }
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, set.join_next()).await {
        if let Ok(d) = done {
            record(d);
        }
    }
    set.abort_all();
    Ok(Level::new(target_qps, schedule, latencies, errors, last))
}

/// The runtime the load generator's futures run on.
pub type Runtime = tokio::runtime::Runtime;

/// A single-threaded runtime for the generator: it shares the machine with
/// the server under test and should take as little of it as it can.
pub fn runtime() -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A tiny HTTP server answering every request after `delay`, one at a
    /// time, on one connection at a time per task.
    async fn slow_server(delay: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let busy = Arc::new(tokio::sync::Mutex::new(()));
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let busy = Arc::clone(&busy);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(h) = find(&buf, b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..h]).to_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse().unwrap());
                            if buf.len() < h + 4 + len {
                                break;
                            }
                            buf.drain(..h + 4 + len);
                            {
                                // One request served at a time, like a
                                // server with one model worker.
                                let _g = busy.lock().await;
                                tokio::time::sleep(delay).await;
                            }
                            let body = b"{\"ok\":true}";
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            );
                            s.write_all(resp.as_bytes()).await.unwrap();
                            s.write_all(body).await.unwrap();
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn open_loop_detects_saturation_over_http() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // 5 ms per request: capacity about 200/s (less with timer slack).
            let addr = slow_server(Duration::from_millis(5)).await;
            let r = request(addr, "POST", "/embed", b"{}").await.unwrap();
            assert_eq!((r.status, r.body.as_slice()), (200, &b"{\"ok\":true}"[..]));

            let s = crate::poisson_schedule(40.0, 80, 2);
            let ok = run_level(addr, "/embed", &[b"{}".to_vec()], 40.0, &s)
                .await
                .unwrap();
            assert!(!ok.saturated, "{:?}", ok.without_samples());
            assert_eq!(ok.completed, 80);

            let s = crate::poisson_schedule(1000.0, 1000, 2);
            let over = run_level(addr, "/embed", &[b"{}".to_vec()], 1000.0, &s)
                .await
                .unwrap();
            assert!(over.saturated, "{:?}", over.without_samples());
            assert!(over.achieved_qps < 400.0, "{}", over.achieved_qps);
            assert!(over.unserved > 0);
        });
    }

    #[test]
    fn refuses_non_loopback_targets() {
        let rt = runtime().unwrap();
        let addr: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let err = rt
            .block_on(run_level(addr, "/", &[Vec::new()], 1.0, &[Duration::ZERO]))
            .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
    }

    #[test]
    fn a_closed_port_is_an_io_error_naming_the_address() {
        let rt = runtime().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // The listener is dropped: nothing listens there now.
        let err = rt
            .block_on(request(port, "GET", "/health", b""))
            .unwrap_err();
        assert!(err.to_string().contains(&port.to_string()), "{err}");
    }
}

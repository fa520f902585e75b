//! The agent's two tiny HTTP surfaces (metrics on localhost, the health exchange
//! between agents on the underlay) on hyper's HTTP/1 connections: GET only, one request
//! per connection, bodies rendered by the caller. An HTTP/1.0 request is answered in
//! HTTP/1.0, so agents of before and after hyper understand each other during a rollout.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Empty, Full};
use hyper::{
    body::{Bytes, Incoming},
    header, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};

/// What one server takes on. Beyond `connections`, callers wait in the listen backlog
/// (the kernel's, bounded) until a connection ends; a connection lives at most
/// `connection_timeout`, of which `head_timeout` to send its request's head of at most
/// `head_bytes` (hyper's smallest buffer). Bodies are never read (GET only).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connections: usize,
    pub head_timeout: Duration,
    pub connection_timeout: Duration,
    pub head_bytes: usize,
}

impl Limits {
    /// The agents' servers: a few callers at a time (peers every resync, a scraper,
    /// meshctl), each answered in well under a second.
    pub const DEFAULT: Limits = Limits {
        connections: 64,
        head_timeout: Duration::from_secs(5),
        connection_timeout: Duration::from_secs(30),
        head_bytes: 8192,
    };
}

/// The largest answer [`ask`] reads: a manager's report of 100,000 tasks is a few MB.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// How long to wait after the `n`-th accept error in a row (n >= 1): EMFILE and the like
/// leave the caller in the backlog, so trying again at once would spin. 10 ms, doubling
/// up to 1 s.
pub fn accept_backoff(n: u32) -> Duration {
    Duration::from_millis(10u64 << n.saturating_sub(1).min(7)).min(Duration::from_secs(1))
}

/// Answers `GET <path>` (the path with its query) with `handler(path, caller)`, 404
/// when it returns None or for any other method, until the runtime stops, within
/// [`Limits::DEFAULT`].
pub async fn serve<F>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(&str, std::net::IpAddr) -> Option<String> + Send + Sync + Clone + 'static,
{
    serve_with(listener, handler, Limits::DEFAULT).await
}

/// As [`serve`], within `limits`.
pub async fn serve_with<F>(listener: tokio::net::TcpListener, handler: F, limits: Limits)
where
    F: Fn(&str, std::net::IpAddr) -> Option<String> + Send + Sync + Clone + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let mut errors = 0u32;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (sock, caller) = match listener.accept().await {
            Ok(c) => {
                errors = 0;
                c
            }
            Err(e) => {
                errors = errors.saturating_add(1);
                if errors == 1 {
                    tracing::warn!(
                        "HTTP on {:?}: accepting a connection failed ({e}); retrying with a \
                         backoff",
                        listener.local_addr().ok()
                    );
                }
                tokio::time::sleep(accept_backoff(errors)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(answer(&req, caller, handler).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.head_timeout)
            .max_buf_size(limits.head_bytes)
            .keep_alive(false)
            .serve_connection(TokioIo::new(sock), service);
        tokio::spawn(async move {
            // Dropped at the deadline: the socket closes with it.
            let _ = tokio::time::timeout(limits.connection_timeout, conn).await;
            drop(slot);
        });
    }
}

async fn answer<F>(req: &Request<Incoming>, caller: SocketAddr, handler: F) -> Response<Full<Bytes>>
where
    F: Fn(&str, std::net::IpAddr) -> Option<String> + Send + 'static,
{
    let body = if req.method() == Method::GET {
        let path = req
            .uri()
            .path_and_query()
            .map_or("", |p| p.as_str())
            .to_string();
        // Off the runtime's thread: a handler reads maps (and a trace runs a program),
        // which must not hold up the agent's loop.
        tokio::task::spawn_blocking(move || handler(&path, caller.ip()))
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    let (status, body) = match body {
        Some(b) => (StatusCode::OK, b),
        None => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    res
}

/// How a peer answered a `GET`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The body of a 200 answer.
    Body(String),
    /// Nothing listens there: the host answered the connection with a reset.
    Refused,
    /// No answer in time, or not a 200 (a host that may be down or cut off).
    Silent,
}

/// `GET path` from `addr`, the body of a 200 answer, within `timeout`.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    match ask(addr, path, timeout).await {
        Answer::Body(b) => Some(b),
        _ => None,
    }
}

/// `GET path` from `addr` within `timeout`, telling a refusal from silence.
pub async fn ask(addr: SocketAddr, path: &str, timeout: Duration) -> Answer {
    let fetch = async {
        let sock = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Answer::Refused,
            Err(_) => return Answer::Silent,
        };
        exchange(sock, addr, path, MAX_ANSWER_BYTES)
            .await
            .map_or(Answer::Silent, Answer::Body)
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .unwrap_or(Answer::Silent)
}

/// One request on `sock`: the body of a 200 answer in UTF-8, of at most `max` bytes.
async fn exchange(
    sock: tokio::net::TcpStream,
    addr: SocketAddr,
    path: &str,
    max: usize,
) -> Option<String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .ok()?;
    let req = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .ok()?;
    let body = async move {
        let res = sender.send_request(req).await.ok()?;
        if res.status() != StatusCode::OK {
            return None;
        }
        let body = http_body_util::Limited::new(res.into_body(), max);
        let bytes = body.collect().await.ok()?.to_bytes();
        String::from_utf8(bytes.to_vec()).ok()
    };
    // The connection is driven here rather than spawned, so that the caller's timeout
    // ends it too; once it ends, `body` ends with what it got.
    let drive = async {
        let _ = conn.await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        body = body => body,
        () = drive => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, |path, caller| match path {
            "/hello" => Some(format!("hello {caller}\n")),
            p if p.starts_with("/echo?") => Some(p.to_string()),
            _ => None,
        }));
        addr
    }

    /// What a raw HTTP/1.0 client (the agents before hyper) reads back.
    async fn raw(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn get_paths_queries_and_the_callers_address() {
        let addr = server().await;
        let t = Duration::from_secs(5);
        assert_eq!(
            ask(addr, "/hello", t).await,
            Answer::Body("hello 127.0.0.1\n".into())
        );
        assert_eq!(
            get(addr, "/echo?from=1.2.3.4:5&to=6.7.8.9:10", t).await,
            Some("/echo?from=1.2.3.4:5&to=6.7.8.9:10".into())
        );
        // A 404 is not an answer.
        assert_eq!(ask(addr, "/nothing", t).await, Answer::Silent);
    }

    #[tokio::test]
    async fn other_methods_are_not_found_and_http_1_0_is_answered_in_kind() {
        let addr = server().await;
        let out = raw(addr, "POST /hello HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nnot found\n"), "{out}");
        // The request of an agent before hyper, and the check it makes of the answer.
        let out = raw(addr, "GET /hello HTTP/1.0\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.0 200"), "{out}");
        assert!(
            out.contains("content-type: text/plain; version=0.0.4\r\n"),
            "{out}"
        );
        assert!(out.ends_with("\r\n\r\nhello 127.0.0.1\n"), "{out}");
    }

    #[tokio::test]
    async fn a_caller_that_sends_nothing_is_let_go() {
        let addr = server().await;
        let started = std::time::Instant::now();
        let out = raw(addr, "").await;
        let waited = started.elapsed();
        assert!(
            waited >= Limits::DEFAULT.head_timeout && waited < Limits::DEFAULT.head_timeout * 2,
            "{waited:?}: {out}"
        );
    }

    #[tokio::test]
    async fn an_http_1_0_server_is_understood() {
        // The answer of an agent before hyper: HTTP/1.0, then the connection closed.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                    .await;
            }
        });
        assert_eq!(
            ask(addr, "/x", Duration::from_secs(5)).await,
            Answer::Body("ok\n".into())
        );
    }

    #[tokio::test]
    async fn refusal_and_silence_are_told_apart() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = l.local_addr().unwrap();
        drop(l);
        let t = Duration::from_millis(300);
        assert_eq!(ask(closed, "/x", t).await, Answer::Refused);
        // Accepted (by the backlog) but never answered: silent once the timeout passes.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(ask(l.local_addr().unwrap(), "/x", t).await, Answer::Silent);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    async fn server_with(limits: Limits) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_with(
            l,
            |path, caller| (path == "/hello").then(|| format!("hello {caller}\n")),
            limits,
        ));
        addr
    }

    #[test]
    fn accept_errors_back_off_up_to_a_second() {
        let ms = |n| accept_backoff(n).as_millis();
        assert_eq!((ms(1), ms(2), ms(3), ms(7)), (10, 20, 40, 640));
        assert_eq!((ms(8), ms(9), ms(u32::MAX)), (1000, 1000, 1000));
    }

    #[tokio::test]
    async fn callers_beyond_the_cap_wait_for_a_free_connection() {
        let addr = server_with(Limits {
            connections: 2,
            head_timeout: Duration::from_secs(20),
            ..Limits::DEFAULT
        })
        .await;
        // Two callers that send nothing hold both connections...
        let idle = [
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(200)).await;
        // ...so a third waits in the backlog, unanswered,
        let t = Duration::from_millis(500);
        assert_eq!(ask(addr, "/hello", t).await, Answer::Silent);
        // until one of them goes.
        let [first, _second] = idle;
        drop(first);
        assert_eq!(
            ask(addr, "/hello", Duration::from_secs(5)).await,
            Answer::Body("hello 127.0.0.1\n".into())
        );
    }

    #[tokio::test]
    async fn a_connection_is_cut_at_its_deadline() {
        let addr = server_with(Limits {
            connection_timeout: Duration::from_millis(300),
            ..Limits::DEFAULT
        })
        .await;
        // Half a request head, then nothing (within the head's own 5 s).
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap_or(0);
        let waited = started.elapsed();
        assert_eq!(n, 0, "closed without an answer");
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_not_served() {
        let addr = server().await;
        let head = format!(
            "GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may close while this is still being written.
        let _ = s.write_all(head.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(!out.contains("hello"), "{out}");
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");
    }

    #[tokio::test]
    async fn answers_over_the_cap_are_not_read() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for len in [1000usize, 1001] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {len}\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&vec![b'x'; len]).await;
            }
        });
        let t = Duration::from_secs(5);
        let fetch = |max| async move {
            let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio::time::timeout(t, exchange(sock, addr, "/x", max))
                .await
                .unwrap()
        };
        assert_eq!(fetch(1000).await.map(|b| b.len()), Some(1000));
        assert_eq!(fetch(1000).await, None, "1,001 bytes over a cap of 1,000");
    }

    #[tokio::test]
    async fn a_kept_open_connection_does_not_hold_the_answer() {
        // A server that answers and keeps the connection open (HTTP/1.1 keep-alive).
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                .await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let started = std::time::Instant::now();
        assert_eq!(
            ask(addr, "/x", Duration::from_secs(10)).await,
            Answer::Body("ok\n".into())
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

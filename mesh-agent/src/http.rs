//! The agent's two tiny HTTP/1.0 surfaces (metrics on localhost, the health exchange
//! between agents on the underlay): GET only, one request per connection, bodies
//! rendered by the caller. Not a web server, on purpose.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers `GET <path>` with `handler(path)` (404 when it returns None) until the
/// runtime stops.
pub async fn serve<F>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(&str, std::net::IpAddr) -> Option<String> + Send + Sync + Clone + 'static,
{
    loop {
        let Ok((mut sock, caller)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req
                .strip_prefix("GET ")
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("");
            // Off the runtime's thread: a handler reads maps (and a trace runs a program),
            // which must not hold up the agent's loop.
            let path = path.to_string();
            let ip = caller.ip();
            let answer = tokio::task::spawn_blocking(move || handler(&path, ip))
                .await
                .ok()
                .flatten();
            let (status, body) = match answer {
                Some(b) => ("200 OK", b),
                None => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
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
        let mut s = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Answer::Refused,
            Err(_) => return Answer::Silent,
        };
        let body = async {
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .await
                .ok()?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.ok()?;
            let text = String::from_utf8(out).ok()?;
            let (head, body) = text.split_once("\r\n\r\n")?;
            head.starts_with("HTTP/1.0 200").then(|| body.to_string())
        };
        body.await.map_or(Answer::Silent, Answer::Body)
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .unwrap_or(Answer::Silent)
}

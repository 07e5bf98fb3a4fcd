//! Reading vmd's OpenMetrics endpoint as a scraper does: a plain HTTP GET,
//! and the value of one sample in the text.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// A TCP port free now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.0: the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    get_as(addr, path, "*/*").map(|(code, _, body)| (code, body))
}

/// `GET path` accepting `accept`: the status, the head and the body.
pub fn get_as(
    addr: SocketAddr,
    path: &str,
    accept: &str,
) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, head.to_owned(), body.to_owned()))
}

/// The value of the sample written exactly `series` (name and labels as
/// the text has them) in a scrape's text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The value of `series` in a scrape of `addr` now (`None`: not there, or
/// no answer).
pub fn scrape_sample(addr: SocketAddr, series: &str) -> Option<f64> {
    let (code, text) = get(addr, "/metrics").ok()?;
    (code == 200).then(|| sample(&text, series)).flatten()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sample_is_found_by_its_whole_series() {
        let text = "a_total{x=\"1\"} 3\na_total{x=\"10\"} 4\nb 2.5\n";
        assert_eq!(super::sample(text, "a_total{x=\"1\"}"), Some(3.0));
        assert_eq!(super::sample(text, "a_total{x=\"10\"}"), Some(4.0));
        assert_eq!(super::sample(text, "b"), Some(2.5));
        assert_eq!(super::sample(text, "a_total"), None);
    }
}

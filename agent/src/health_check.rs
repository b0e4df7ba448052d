//! `fleet-agent --health-check`: ask the running agent's `/healthz` on its control
//! endpoint and exit 0 when it serves, 1 when not (the container image's
//! `HEALTHCHECK`, which has no shell or curl to do it). It reads the same config file
//! and flags as the agent, so it finds the port the agent listens on (and nothing
//! else: a token file or TLS files are the agent's business, not the probe's). A wildcard control
//! address is asked on loopback, where the endpoint speaks plain HTTP even with mTLS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::config::ConfigError;

/// How long the whole check may take: a health check that hangs is a failed one.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Probe the agent listening on `control`; print what it answered.
pub fn run(control: Result<SocketAddr, ConfigError>) -> ExitCode {
    let addr = match control {
        Ok(addr) => probe_addr(addr),
        Err(e) => {
            println!("unhealthy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("unhealthy: cannot start the check: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async { tokio::time::timeout(TIMEOUT, healthz(addr)).await }) {
        Ok(Ok((200, body))) => {
            println!("healthy: {addr} /healthz answered 200 {}", body.trim());
            ExitCode::SUCCESS
        }
        Ok(Ok((status, body))) => {
            println!(
                "unhealthy: {addr} /healthz answered {status} {}",
                body.trim()
            );
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            println!("unhealthy: {addr} /healthz: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            println!("unhealthy: {addr} /healthz gave no answer within {TIMEOUT:?}");
            ExitCode::FAILURE
        }
    }
}

/// The address to ask: a wildcard listen address is reached on loopback.
fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

async fn healthz(addr: SocketAddr) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect ({e}); is the agent running?"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::get("/healthz")
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_control_address_is_asked_on_loopback() {
        let probe = |s: &str| probe_addr(s.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:7101"), "127.0.0.1:7101");
        assert_eq!(probe("[::]:7101"), "[::1]:7101");
        assert_eq!(probe("10.0.0.5:7101"), "10.0.0.5:7101");
    }
}

//! A node can run several named servers with several ports each, some over HTTPS
//! (HTTP/2 by ALPN); one restart moves every port of every server to the new worker.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_proto::v1::{Outcome, RestartRequest};
use fleet_tests::harness::{
    HttpResponse, Server, TlsFiles, eventually, http_get, https_h2_get, parse_pid,
};
use fleet_tests::{Agent, AgentOpts};
use http::Version;

/// `GET /pid` on one port: plain HTTP/1.1, or HTTPS that must negotiate HTTP/2.
async fn pid_on(server: &Server, addr: SocketAddr, tls: &TlsFiles) -> Result<u32, String> {
    let response: HttpResponse = if server.tls {
        let response = https_h2_get(addr, "/pid", &tls.cert_der).await?;
        if response.version != Version::HTTP_2 {
            return Err(format!(
                "{addr} answered with {:?}, not HTTP/2",
                response.version
            ));
        }
        response
    } else {
        http_get(addr, "/pid").await?
    };
    parse_pid(&response)
}

#[tokio::test]
async fn one_restart_moves_all_four_ports_of_two_servers_one_over_https_h2() {
    let certs = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(certs.path());
    let config = format!(
        r#"
node_id = "two-servers"

[control]
listen = "127.0.0.1:0"

[[servers]]
name = "web"
listen = ["127.0.0.1:0", "127.0.0.1:0"]

[[servers]]
name = "secure"
listen = ["127.0.0.1:0", "127.0.0.1:0"]
tls = {{ cert = "{}", key = "{}" }}
"#,
        tls.cert_pem.display(),
        tls.key_pem.display()
    );
    let agent = Agent::start(AgentOpts {
        listen: Vec::new(),
        control: None,
        config: Some(config),
        servers: 2,
        ..Default::default()
    })
    .await;
    let web = agent.servers().iter().find(|s| s.name == "web").cloned();
    let secure = agent.servers().iter().find(|s| s.name == "secure").cloned();
    let (Some(web), Some(secure)) = (web, secure) else {
        agent.fail(&format!(
            "expected servers 'web' and 'secure': {:?}",
            agent.servers()
        ));
    };
    assert!(!web.tls && secure.tls, "{:?}", agent.servers());
    assert_eq!(
        (web.addrs.len(), secure.addrs.len()),
        (2, 2),
        "{:?}",
        agent.servers()
    );
    let ports: Vec<(&Server, SocketAddr)> = [&web, &secure]
        .into_iter()
        .flat_map(|s| s.addrs.iter().map(move |a| (s, *a)))
        .collect();

    let listeners = agent.status().await["listeners"].clone();
    assert_eq!(listeners.as_array().map(Vec::len), Some(4), "{listeners}");

    let old = agent.worker_pid().await;
    for (server, addr) in &ports {
        let pid = pid_on(server, *addr, &tls)
            .await
            .unwrap_or_else(|e| agent.fail(&e));
        assert_eq!(pid, old, "{} {addr} is served by the worker", server.name);
    }

    let response = agent
        .grpc()
        .await
        .restart(agent.request(RestartRequest::default()))
        .await
        .unwrap_or_else(|status| agent.fail(&format!("gRPC Restart: {status}")))
        .into_inner();
    assert_eq!(response.outcome(), Outcome::Succeeded, "{response:?}");
    let new = response.new_pid;
    assert_ne!(new, old);

    for (server, addr) in &ports {
        eventually(
            Duration::from_secs(10),
            &format!(
                "{} {addr} to be served by the new worker {new}",
                server.name
            ),
            async || match pid_on(server, *addr, &tls).await? {
                pid if pid == new => Ok(()),
                pid => Err(format!("served by {pid}")),
            },
        )
        .await;
    }
}

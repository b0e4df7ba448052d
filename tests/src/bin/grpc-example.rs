//! Run with: cargo run -p fleet-tests --bin grpc-example -- --listen 127.0.0.1:50051 --control 127.0.0.1:7102
//!
//! A gRPC server with zero-downtime restarts. A tonic service becomes an axum
//! `Router` (`tonic::service::Routes`), and `fleet_agent::run` serves that router the
//! way it serves any app: the agent's servers speak HTTP/2 without TLS (h2c, what a
//! plaintext gRPC client sends) next to HTTP/1.1 on the same port.
//!
//! Call it with this same program, which is also a tiny client:
//!
//! ```text
//! cargo run -p fleet-tests --bin grpc-example -- call 127.0.0.1:50051 hello
//! "hello" answered by pid 4242, generation 1
//! ```
//!
//! or with grpcurl (the server has no reflection: give grpcurl the proto):
//!
//! ```text
//! grpcurl -plaintext -import-path tests/proto -proto fleet/example/v1/echo.proto \
//!   -d '{"payload": "hello"}' 127.0.0.1:50051 fleet.example.v1.Echo/Echo
//! ```
//!
//! Then restart the node (`kill -USR1 <pid>` of the program you started, or
//! `curl -X POST 127.0.0.1:7102/debug/admin/restart`) and call again: another pid,
//! generation 2. A long call in flight during the restart is answered by the old
//! generation before it exits:
//!
//! ```text
//! cargo run -p fleet-tests --bin grpc-example -- call 127.0.0.1:50051 slow --sleep-ms 5000
//! ```
//!
//! The service is `tests/proto/fleet/example/v1/echo.proto`, compiled by
//! `tests/build.rs`; `tests/tests/grpc_restarts.rs` runs this binary under load across
//! a hundred restarts.

use std::process::ExitCode;
use std::time::Duration;

use tonic::{Request, Response, Status};

mod pb {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("fleet.example.v1");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest, SleepRequest};

/// The longest `Sleep` this server accepts.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The app: what each reply says about the process that answered.
#[derive(Debug, Clone, Copy)]
struct EchoApp {
    pid: u32,
    generation: u64,
}

impl EchoApp {
    fn reply(&self, payload: String) -> Response<EchoReply> {
        Response::new(EchoReply {
            payload,
            pid: self.pid,
            generation: self.generation,
        })
    }
}

#[tonic::async_trait]
impl Echo for EchoApp {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(self.reply(request.into_inner().payload))
    }

    async fn sleep(&self, request: Request<SleepRequest>) -> Result<Response<EchoReply>, Status> {
        let SleepRequest { ms, payload } = request.into_inner();
        let sleep = Duration::from_millis(ms);
        if sleep > MAX_SLEEP {
            return Err(Status::invalid_argument(format!(
                "sleep of {ms} ms is over the limit of {} ms: ask for less",
                MAX_SLEEP.as_millis()
            )));
        }
        tokio::time::sleep(sleep).await;
        Ok(self.reply(payload))
    }
}

/// The whole app as an axum `Router`: what `fleet_agent::run` serves in each worker.
fn router() -> axum::Router {
    let app = EchoApp {
        pid: std::process::id(),
        // Set by the supervisor for each worker it starts.
        generation: std::env::var("FLEET_GENERATION")
            .ok()
            .and_then(|g| g.parse().ok())
            .unwrap_or(0),
    };
    tonic::service::Routes::new(EchoServer::new(app))
        .prepare()
        .into_axum_router()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "call") {
        return call(&args[1..]);
    }
    fleet_agent::run(router)
}

/// `call ADDR [PAYLOAD] [--sleep-ms N]`: one call, its reply on stdout.
fn call(args: &[String]) -> ExitCode {
    const USAGE: &str = "usage: grpc-example call ADDR [PAYLOAD] [--sleep-ms N]";
    let mut positional = Vec::new();
    let mut sleep_ms = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--sleep-ms" => match args.next().and_then(|n| n.parse::<u64>().ok()) {
                Some(ms) => sleep_ms = Some(ms),
                None => {
                    eprintln!("--sleep-ms takes a number of milliseconds\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            _ => positional.push(arg.clone()),
        }
    }
    let (addr, payload) = match positional.as_slice() {
        [addr] => (addr.clone(), String::new()),
        [addr, payload] => (addr.clone(), payload.clone()),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reply = runtime.block_on(async {
        let mut client = EchoClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let reply = match sleep_ms {
            Some(ms) => client.sleep(SleepRequest { ms, payload }).await,
            None => client.echo(EchoRequest { payload }).await,
        };
        reply
            .map(Response::into_inner)
            .map_err(|status| format!("the call to {addr} failed: {status}"))
    });
    match reply {
        Ok(EchoReply {
            payload,
            pid,
            generation,
        }) => {
            println!("{payload:?} answered by pid {pid}, generation {generation}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

//! High availability on etcd: several controllers share one etcd store; one of them,
//! the leader, runs the rollout engines, accepts heartbeats and calls agents. The
//! others follow: they serve reads (refreshed from etcd watches) and answer every state
//! change with `UNAVAILABLE` naming the leader ([`fleet_proto::ha`]), which `fleetctl`,
//! agents and the dashboard follow.
//!
//! Election: etcd's election service on a key bound to this controller's lease
//! (`--lease-ttl`, renewed every third of it). Leadership ends when the lease does:
//!
//! - **Fencing**: every write of the leader is an etcd transaction conditioned on its
//!   election key's create revision ([`crate::store::Fence`]); once the lease expired
//!   (or another controller won), that key is gone or another, so a deposed leader's
//!   writes are refused by etcd itself, whatever it believes.
//! - **No agent call after the lease ran out**: [`Ha::is_leader`] is false as soon as
//!   the last renewal is older than three quarters of the TTL, by the monotonic clock
//!   (which runs on while the process is stopped), so a leader woken from `SIGSTOP`
//!   or a long pause knows before it acts; the engine claims each node step in etcd
//!   before it calls the node's agent.
//! - **Stepping down**: a controller that lost its leadership follows again at once
//!   and campaigns anew. Each election won starts a new *term*; a rollout's engine
//!   acts only in the term its rollout was loaded in, so an engine left over from an
//!   earlier term never acts again, even if this controller is elected anew.
//! - **No quorum**: while etcd cannot commit (a majority of its members down), no
//!   controller leads, every change is refused with [`fleet_proto::ha::NO_QUORUM_METADATA`],
//!   and reads are served from what each controller last loaded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};
use tokio::sync::watch;

use crate::fleet::Fleet;
use crate::follow::Burst;
use crate::now_ms;
use crate::store::{EtcdStore, Fence};

/// What this controller is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not leading; the leader's URL when one is known.
    Follower { leader: Option<String> },
    /// Leading since this time (unix ms).
    Leader { since_unix_ms: u64 },
}

/// This controller's part in the election.
#[derive(Debug)]
pub struct Ha {
    store: Arc<EtcdStore>,
    /// The URL other controllers, agents and `fleetctl` reach this one at.
    advertise: String,
    started_unix_ms: u64,
    ttl: Duration,
    role: watch::Sender<Role>,
    /// When the lease was last renewed while leading.
    renewed: Mutex<Option<Instant>>,
    /// The leader the election named last (this controller's own URL included).
    observed: Mutex<Option<String>>,
    /// Incremented by each election this controller wins.
    term: std::sync::atomic::AtomicU64,
    /// Since when lease grants fail, without one granted since.
    grant_failing_since: Mutex<Option<Instant>>,
    /// Whether etcd answered the last lease or election call (a quorum is there).
    quorum: std::sync::atomic::AtomicBool,
}

/// This process's election, once it takes part in one (for views that have no
/// [`Fleet`] at hand, like the dashboard's header).
static CURRENT: std::sync::OnceLock<Arc<Ha>> = std::sync::OnceLock::new();

/// This process's election, if it takes part in one.
pub fn current() -> Option<&'static Arc<Ha>> {
    CURRENT.get()
}

impl Ha {
    /// Registers this process's election ([`current`]); the first one stays.
    pub fn install(self: &Arc<Self>) {
        let _ = CURRENT.set(self.clone());
    }

    pub fn new(store: Arc<EtcdStore>, advertise: String, ttl: Duration) -> Arc<Ha> {
        Arc::new(Ha {
            store,
            advertise,
            started_unix_ms: now_ms(),
            ttl,
            role: watch::channel(Role::Follower { leader: None }).0,
            renewed: Mutex::new(None),
            observed: Mutex::new(None),
            grant_failing_since: Mutex::new(None),
            term: Default::default(),
            quorum: std::sync::atomic::AtomicBool::new(true),
        })
    }

    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// The current leadership term of this controller (see the module's docs).
    pub fn term(&self) -> u64 {
        self.term.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether etcd answered this controller's last lease or election call.
    pub fn quorum(&self) -> bool {
        self.quorum.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_quorum(&self, quorum: bool) {
        let was = self
            .quorum
            .swap(quorum, std::sync::atomic::Ordering::Relaxed);
        if was && !quorum {
            tracing::warn!(
                "etcd does not answer (no quorum?): no controller can change the fleet until it does"
            );
        } else if !was && quorum {
            tracing::info!("etcd answers again");
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Leading, with a lease renewed recently enough that etcd still holds it.
    pub fn is_leader(&self) -> bool {
        matches!(*self.role.borrow(), Role::Leader { .. })
            && self
                .renewed
                .lock()
                .expect("renewed lock")
                .is_some_and(|at| at.elapsed() < self.ttl * 3 / 4)
    }

    /// The leader's URL, if known (this controller's own when it leads).
    pub fn leader_url(&self) -> Option<String> {
        match &*self.role.borrow() {
            Role::Leader { .. } => Some(self.advertise.clone()),
            Role::Follower { leader } => leader.clone(),
        }
    }

    /// The answer to a state change sent to a controller that does not lead.
    pub fn not_leader(&self) -> tonic::Status {
        if !self.quorum() {
            let mut status = tonic::Status::unavailable(format!(
                "the store has no quorum (etcd at {} does not answer): nothing was changed, and no \
                 controller can change the fleet until a majority of etcd's members is back",
                self.store.url().trim_start_matches("etcd://")
            ));
            status.metadata_mut().insert(
                fleet_proto::ha::NO_QUORUM_METADATA,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            return status;
        }
        let leader = match &*self.role.borrow() {
            Role::Leader { .. } => None, // a leader whose lease ran out: no one to name
            Role::Follower { leader } => leader.clone(),
        };
        let message = match &leader {
            Some(url) => format!(
                "this controller ({}) is a follower; the leader is {url}: send changes there \
                 (fleetctl does, given every controller's URL in --controller)",
                self.advertise
            ),
            None => format!(
                "this controller ({}) is not the leader and no leader is elected right now \
                 (an election takes up to the lease TTL, {}): try again shortly",
                self.advertise,
                humantime::format_duration(self.ttl)
            ),
        };
        let mut status = tonic::Status::unavailable(message);
        if let Some(url) = leader
            && let Ok(value) = url.parse()
        {
            status
                .metadata_mut()
                .insert(fleet_proto::ha::LEADER_METADATA, value);
        }
        status
    }

    fn set_role(&self, role: Role) {
        self.role.send_if_modified(|now| {
            if *now == role {
                return false;
            }
            *now = role;
            true
        });
    }
}

/// Takes part in the election for as long as the controller runs.
pub async fn run(ha: Arc<Ha>, fleet: Arc<Fleet>) {
    let store = ha.store.clone();
    let election = format!("{}leader", store.prefix());
    let client = store.client();
    revoke_own_stale_lease(&ha, client.clone(), &election).await;
    tokio::spawn(observe(ha.clone(), client.clone(), election.clone()));
    tokio::spawn(follow(
        ha.clone(),
        client.clone(),
        store.clone(),
        fleet.clone(),
    ));
    loop {
        match lead(&ha, client.clone(), &store, &fleet, &election).await {
            Ok(()) => {}
            Err(e) => {
                tracing::debug!("leader election: {e}; trying again");
                tokio::time::sleep(ha.ttl / 3).await;
            }
        }
    }
}

/// This controller, restarted on its own address, finds the election held by its
/// previous run (killed before it could resign): that lease is revoked at once, so
/// that the group need not wait a whole TTL for a leader that is gone.
async fn revoke_own_stale_lease(ha: &Ha, mut client: Client, election: &str) {
    let Ok(Ok(answer)) =
        tokio::time::timeout(Duration::from_secs(2), client.leader(election)).await
    else {
        return;
    };
    if let Some(kv) = answer.kv()
        && kv.value() == ha.advertise.as_bytes()
        && kv.lease() != 0
        && client.lease_revoke(kv.lease()).await.is_ok()
    {
        tracing::info!("revoked the lease left by this controller's previous run");
    }
}

/// Campaigns; once elected, leads until the lease is lost, then steps down.
async fn lead(
    ha: &Arc<Ha>,
    mut client: Client,
    store: &Arc<EtcdStore>,
    fleet: &Arc<Fleet>,
    election: &str,
) -> Result<(), etcd_client::Error> {
    let ttl_secs = i64::try_from(ha.ttl.as_secs().max(2)).unwrap_or(i64::MAX);
    // A lease is granted only by a quorum: whether that works is what this controller
    // reports as the store's quorum (a campaign's own errors, e.g. its request timing
    // out while another controller leads, say nothing of it).
    let lease = match client.lease_grant(ttl_secs, None).await {
        Ok(lease) => {
            ha.set_quorum(true);
            lease.id()
        }
        Err(e) => {
            // One member dying fails a call or two (on its connection) before the
            // client moves on: only a TTL of failures in a row means no quorum.
            let since = *ha
                .grant_failing_since
                .lock()
                .expect("grant lock")
                .get_or_insert_with(Instant::now);
            if since.elapsed() >= ha.ttl {
                ha.set_quorum(false);
            }
            return Err(e);
        }
    };
    *ha.grant_failing_since.lock().expect("grant lock") = None;
    let (keeper, answers) = client.lease_keep_alive(lease).await?;
    // Listed among the group's controllers for as long as the lease lives.
    let me = Registered {
        url: ha.advertise.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_unix_ms: ha.started_unix_ms,
    };
    client
        .put(
            registry_key(store.prefix(), &ha.advertise),
            serde_json::to_vec(&me).unwrap_or_default(),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await?;
    // Renew the lease from the start: a campaign may wait long for the leader to go.
    let (lost_tx, mut lost) = tokio::sync::oneshot::channel::<String>();
    let renewer = {
        let ha = ha.clone();
        let mut client = client.clone();
        tokio::spawn(async move {
            let every = ha.ttl / 3;
            // The keep-alive stream runs over one connection to one etcd member: when
            // that member dies the stream breaks, and a new one (to a member that
            // answers) is opened at the next attempt.
            let mut stream = Some((keeper, answers));
            loop {
                let renewed = async {
                    if stream.is_none() {
                        stream = Some(client.lease_keep_alive(lease).await?);
                    }
                    let (keeper, answers) = stream.as_mut().expect("opened above");
                    keeper.keep_alive().await?;
                    answers.message().await
                };
                let outcome = tokio::time::timeout(every, renewed).await;
                let failed = match outcome {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                        let mut at = ha.renewed.lock().expect("renewed lock");
                        *at = Some(Instant::now());
                        false
                    }
                    Ok(Ok(Some(_))) => {
                        let _ = lost_tx.send("the lease expired".to_string());
                        return;
                    }
                    Ok(Ok(None)) => {
                        tracing::warn!("lease renewal: the keep-alive stream ended; reopening it");
                        true
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(
                            "lease renewal failed: {e}; reopening the keep-alive stream"
                        );
                        true
                    }
                    Err(_) => {
                        tracing::warn!(
                            "lease renewal got no answer within {every:?}; reopening the keep-alive stream"
                        );
                        true
                    }
                };
                if failed {
                    crate::metrics::global().lease_renew_failed();
                    stream = None;
                }
                let renewed = *ha.renewed.lock().expect("renewed lock");
                if renewed.is_none_or(|at| at.elapsed() >= ha.ttl) {
                    let _ = lost_tx.send(format!(
                        "the lease was not renewed for {}",
                        humantime::format_duration(ha.ttl)
                    ));
                    return;
                }
                let pause = if failed {
                    Duration::from_millis(100)
                } else {
                    every.saturating_sub(Duration::from_millis(50))
                };
                tokio::time::sleep(pause).await;
            }
        })
    };
    *ha.renewed.lock().expect("renewed lock") = Some(Instant::now());
    let campaign = client.campaign(election, ha.advertise.as_str(), lease);
    let won = tokio::select! {
        won = campaign => won?,
        why = &mut lost => {
            renewer.abort();
            tracing::warn!("lease lost while campaigning ({}); campaigning again", why.unwrap_or_default());
            return Ok(());
        }
    };
    let Some(key) = won.leader() else {
        renewer.abort();
        return Ok(());
    };
    let fence = Fence {
        key: String::from_utf8_lossy(key.key()).into_owned(),
        create_revision: key.rev(),
    };
    store.set_fence(Some(fence));
    // A new term: engines of earlier terms (if any are left) never act again.
    ha.term.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    crate::metrics::global().leader_changed();
    if let Err(e) = fleet.take_over(&ha.advertise) {
        tracing::error!("cannot load the fleet's state after the election: {e}; stepping down");
        renewer.abort();
        let _ = client.lease_revoke(lease).await;
        step_down(ha, store, fleet, "its state could not be loaded");
        return Ok(());
    }
    ha.set_role(Role::Leader {
        since_unix_ms: now_ms(),
    });
    tracing::info!(
        "elected leader ({}, term {}, lease TTL {}): took over",
        ha.advertise,
        ha.term(),
        humantime::format_duration(ha.ttl)
    );
    fleet.resume_unfinished();
    let why = lost
        .await
        .unwrap_or_else(|_| "the lease renewal stopped".into());
    renewer.abort();
    step_down(ha, store, fleet, &why);
    Ok(())
}

/// Leaves the leadership: from now on this controller follows (and campaigns again).
/// Its engines stop at their next step ([`Fleet::may_drive`]); its writes would be
/// refused by etcd anyway.
fn step_down(ha: &Ha, store: &EtcdStore, fleet: &Fleet, why: &str) {
    tracing::warn!("lost the leadership ({why}): following again; the next leader carries on");
    // Whoever the election named meanwhile (seen while this controller still thought
    // it led), unless that is this controller's own, now stale, key.
    let leader = ha
        .observed
        .lock()
        .expect("observed lock")
        .clone()
        .filter(|url| *url != ha.advertise);
    if let Some(url) = &leader {
        tracing::info!("the leader is {url}");
    }
    ha.set_role(Role::Follower { leader });
    store.set_fence(None);
    *ha.renewed.lock().expect("renewed lock") = None;
    fleet.step_down();
}

/// Keeps [`Role::Follower`]'s leader URL current.
async fn observe(ha: Arc<Ha>, mut client: Client, election: String) {
    loop {
        let observed = async {
            let mut stream = client.observe(election.as_str()).await?;
            while let Some(answer) = stream.message().await? {
                let url = answer
                    .kv()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                url.clone_into(&mut ha.observed.lock().expect("observed lock"));
                if !matches!(ha.role(), Role::Leader { .. }) {
                    if let Some(url) = &url
                        && ha.leader_url().as_ref() != Some(url)
                        && *url != ha.advertise
                    {
                        tracing::info!("the leader is {url}");
                        crate::metrics::global().leader_changed();
                    }
                    ha.set_role(Role::Follower { leader: url });
                }
            }
            Ok::<(), etcd_client::Error>(())
        };
        if let Err(e) = observed.await {
            tracing::debug!("observing the election: {e}");
        }
        if !matches!(ha.role(), Role::Leader { .. }) {
            ha.set_role(Role::Follower { leader: None });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// While following: the fleet's state kept current from etcd's watch. Read whole once
/// the watch is open (what was written before it comes in no event) and whenever a
/// burst could not be applied; otherwise each burst of events (what arrives within
/// 100 ms of the first) is applied key by key ([`crate::follow`]).
async fn follow(ha: Arc<Ha>, mut client: Client, store: Arc<EtcdStore>, fleet: Arc<Fleet>) {
    let prefix = store.prefix().to_string();
    loop {
        let watched = async {
            let mut stream = client
                .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
                .await?;
            let mut whole = true;
            loop {
                let leading = matches!(ha.role(), Role::Leader { .. });
                if whole && !leading {
                    match fleet.reload() {
                        Ok(done) => whole = !done,
                        Err(e) => tracing::warn!("cannot read the fleet's state from etcd: {e}"),
                    }
                }
                let Some(answer) = stream.message().await? else {
                    return Ok(());
                };
                if matches!(ha.role(), Role::Leader { .. }) {
                    // Its memory is the truth; should it follow again, it reads whole.
                    whole = true;
                    continue;
                }
                let mut burst = Burst::default();
                add_events(&mut burst, &answer, &prefix);
                if burst.is_empty() {
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                while let Ok(more) = tokio::time::timeout(Duration::ZERO, stream.message()).await {
                    match more? {
                        Some(answer) => add_events(&mut burst, &answer, &prefix),
                        None => return Ok(()),
                    }
                }
                if whole {
                    continue;
                }
                match fleet.follow(burst) {
                    Ok(applied) => whole = !applied,
                    Err(e) => {
                        tracing::warn!("cannot follow the fleet's state in etcd: {e}");
                        whole = true;
                    }
                }
            }
        };
        let result: Result<(), etcd_client::Error> = watched.await;
        if let Err(e) = result {
            tracing::debug!("watching etcd: {e}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The puts and deletes of one watch answer, keys made relative to `prefix`.
fn add_events(burst: &mut Burst, answer: &etcd_client::WatchResponse, prefix: &str) {
    for event in answer.events() {
        let Some(kv) = event.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key());
        let Some(key) = key.strip_prefix(prefix) else {
            continue;
        };
        match event.event_type() {
            EventType::Put => burst.add(key, Some(kv.value())),
            EventType::Delete => burst.add(key, None),
        }
    }
}

/// Whether a request changes the fleet: only the leader takes those.
fn changes_state(method: &axum::http::Method, path: &str) -> bool {
    const CHANGES: &[&str] = &[
        "Heartbeat",
        "HeartbeatStream",
        "RestartNode",
        "ShutdownNode",
        "StartRollout",
        "PauseRollout",
        "ResumeRollout",
        "AbortRollout",
        "UndoRollout",
        "ForgetNode",
        "CreateToken",
        "RevokeToken",
        "Join",
        "Renew",
    ];
    // A dashboard action's GET is its confirmation page: a read.
    *method == axum::http::Method::POST
        && crate::auth::route(method, path).is_some_and(|r| CHANGES.contains(&r.name))
}

/// On a controller that does not lead, every state change is answered with where the
/// leader is: gRPC `UNAVAILABLE` with [`fleet_proto::ha::LEADER_METADATA`], a
/// dashboard form with a `307` to the same action on the leader (which asks the
/// browser to log in there, sessions being per controller).
///
/// A browser never posts a form across: the dashboard's pages are served here, but
/// an action's confirmation page (the `GET` of a path whose `POST` is a change: a
/// node's Restart, /rollouts/new, …) is answered with a `307` to the same page on the
/// leader, so its form posts to the leader from the leader's own page, with the
/// leader's session and CSRF token (`form-action 'self'` and the same-origin check
/// would refuse a form posted from here and redirected).
pub async fn leader_only(
    axum::extract::State(fleet): axum::extract::State<Arc<Fleet>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(refusal) = fleet.not_leader() else {
        return next.run(request).await;
    };
    let action_page = request.method() == axum::http::Method::GET
        && changes_state(&axum::http::Method::POST, request.uri().path());
    if action_page && let Some(url) = fleet.ha().and_then(|ha| ha.leader_url()) {
        return to_leader(&url, request.uri(), refusal.message());
    }
    if !changes_state(request.method(), request.uri().path()) {
        let mut response = next.run(request).await;
        if fleet.ha().is_some_and(|ha| !ha.quorum()) {
            // Read from what this controller last loaded: say that it may be stale.
            response.headers_mut().insert(
                fleet_proto::ha::NO_QUORUM_METADATA,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        return response;
    }
    let grpc = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        return refusal.into_http();
    }
    let leader = fleet.ha().and_then(|ha| ha.leader_url());
    match leader {
        Some(url) => to_leader(&url, request.uri(), refusal.message()),
        None => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "2")],
            format!("{}\n", refusal.message()),
        )
            .into_response(),
    }
}

/// `307` to the same path and query on the leader at `url` (method and body kept).
fn to_leader(url: &str, uri: &axum::http::Uri, why: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let target = format!("{}{uri}", url.trim_end_matches('/'));
    (
        axum::http::StatusCode::TEMPORARY_REDIRECT,
        [(axum::http::header::LOCATION, target)],
        format!("{why}\n"),
    )
        .into_response()
}

/// A controller's entry in the group's registry (`<prefix>controllers/<url>`), bound
/// to its lease: it disappears with the controller.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Registered {
    url: String,
    version: String,
    started_unix_ms: u64,
}

fn registry_key(prefix: &str, url: &str) -> String {
    format!("{prefix}controllers/{url}")
}

impl Ha {
    /// The group: every registered controller (the leader marked), the etcd members'
    /// health, and whether there is a quorum (`fleetctl controllers`).
    pub async fn controllers(&self) -> fleet_proto::v1::ControllersResponse {
        use fleet_proto::v1 as pb;
        let mut client = self.store.client();
        let prefix = registry_key(self.store.prefix(), "");
        let listed = tokio::time::timeout(
            Duration::from_secs(2),
            client.get(
                prefix.as_str(),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_serializable(),
                ),
            ),
        )
        .await;
        let leader = self.leader_url();
        let leader_since = match self.role() {
            Role::Leader { since_unix_ms } => since_unix_ms,
            Role::Follower { .. } => 0,
        };
        let mut controllers: Vec<pb::ControllerInfo> = match listed {
            Ok(Ok(answer)) => answer
                .kvs()
                .iter()
                .filter_map(|kv| serde_json::from_slice::<Registered>(kv.value()).ok())
                .map(|r| pb::ControllerInfo {
                    leader: leader.as_deref() == Some(r.url.as_str()),
                    leader_since_unix_ms: if r.url == self.advertise {
                        leader_since
                    } else {
                        0
                    },
                    url: r.url,
                    version: r.version,
                    started_unix_ms: r.started_unix_ms,
                })
                .collect(),
            _ => Vec::new(),
        };
        if !controllers.iter().any(|c| c.url == self.advertise) {
            controllers.push(pb::ControllerInfo {
                url: self.advertise.clone(),
                leader: matches!(self.role(), Role::Leader { .. }),
                leader_since_unix_ms: leader_since,
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_unix_ms: self.started_unix_ms,
            });
        }
        controllers.sort_by(|a, b| a.url.cmp(&b.url));
        let members = self.store.members().await;
        let healthy = members.iter().filter(|m| m.healthy).count();
        pb::ControllersResponse {
            store: self.store.url(),
            answered_by: self.advertise.clone(),
            controllers,
            quorum: healthy * 2 > members.len(),
            members,
        }
    }
}
